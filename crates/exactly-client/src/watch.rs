//! [`Watch`]: `Jobs.Watch` as a stream of job events that survives disconnects.
//!
//! Every node numbers events by the same position (the log index of the entry that caused them
//! and the place within it), so a watch that loses its node resumes on any other one from the last
//! position it delivered. A watch "from now" first asks the node for its applied log index and
//! watches after it, so even a disconnect before the first event loses nothing.

use std::time::{Duration, Instant};

use exactly_proto::v1::cluster_client::ClusterClient;
use exactly_proto::v1::jobs_client::JobsClient;
use exactly_proto::v1::{JobEventMessage, StatusRequest, WatchRequest};
use tonic::codec::Streaming;
use tonic::{Code, Status};

use crate::client::{with_timeout, CallHead};
use crate::retry::{backoff_delay_ms, decide, may_retry, CallKind, Decision, Failure};
use crate::{Client, Error, EventPosition};

/// Which events a [`Watch`] delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchScope {
    /// Every job's events.
    All,
    /// The events of one job.
    Job(u64),
    /// The events of the jobs of one queue.
    Queue(String),
}

/// An event's position as a comparable pair.
type Position = (u64, u32);

/// A stream of job state changes that reconnects by itself.
///
/// When the stream breaks (the node stopped, the connection dropped, a keep-alive ping went
/// unanswered, the node ended the stream) the watch reconnects to the next endpoint and resumes
/// after the last position it delivered: no event is delivered twice and, as long as the
/// cluster retains the events, none is skipped. Reconnecting is bounded like any call
/// ([`ClientOptions::retry_total_ms_max`](crate::ClientOptions) per outage).
///
/// Nodes keep a bounded window of recent events. If every endpoint answers that the resume
/// position is older than what it keeps, [`Watch::next`] fails with
/// [`Error::WatchPositionLost`]: events were missed, so re-read the state and watch from now.
/// A watch with nothing to report stays silent; it never ends by itself.
#[derive(Debug)]
pub struct Watch {
    client: Client,
    scope: WatchScope,
    /// The last position delivered, or the one the watch started after.
    after: Option<Position>,
    stream: Option<Streaming<JobEventMessage>>,
    /// The endpoint the current (or last) stream came from.
    endpoint: usize,
    /// Endpoints that refused to serve from `after` for a node-local reason (the position is
    /// no longer retained there, or the node serves too many watches), with that refusal.
    refused: Vec<Option<Failure>>,
    /// Streams that broke since the last delivered event; spaces out reconnects to a node that
    /// accepts a watch and drops it again at once.
    drops_since_event: u32,
    reconnects: u64,
}

impl Watch {
    /// Opens the first stream, so that bad arguments and an unreachable cluster are reported here.
    pub(crate) async fn open(
        client: Client,
        scope: WatchScope,
        after: Option<EventPosition>,
    ) -> Result<Watch, Error> {
        let count = client.inner.endpoints.len();
        let start = client
            .inner
            .preferred
            .load(std::sync::atomic::Ordering::Relaxed)
            % count;
        let mut watch = Watch {
            client,
            scope,
            after: after.map(|p| (p.index, p.seq)),
            stream: None,
            endpoint: start,
            refused: vec![None; count],
            drops_since_event: 0,
            reconnects: 0,
        };
        watch.connect(start).await?;
        Ok(watch)
    }

    /// The next event. Waits as long as it takes; reconnects as needed (see [`Watch`]). An error
    /// is final for the current attempt; calling `next` again tries once more from the same
    /// position.
    pub async fn next(&mut self) -> Result<JobEventMessage, Error> {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                self.reconnect().await?;
                continue;
            };
            match stream.message().await {
                Ok(Some(event)) => {
                    let Some(position) = event.position.as_ref() else {
                        return Err(Error::Protocol {
                            message: format!("an event of job {} has no position", event.job_id),
                            endpoint: self.endpoint(),
                        });
                    };
                    let position = (position.index, position.seq);
                    // A node may repeat what another already delivered (it resumed from an
                    // older position than ours): skip it rather than deliver it twice.
                    if self.after.is_some_and(|after| position <= after) {
                        continue;
                    }
                    self.after = Some(position);
                    self.drops_since_event = 0;
                    self.refused.iter_mut().for_each(|r| *r = None);
                    return Ok(event);
                }
                Ok(None) => {
                    // The node ended the stream (it is shutting down): go elsewhere.
                    tracing::debug!(endpoint = %self.endpoint(), "watch stream ended; reconnecting");
                    self.stream = None;
                }
                Err(status) => {
                    self.stream = None;
                    let failure = Failure::from_status(&status);
                    tracing::debug!(
                        endpoint = %self.endpoint(),
                        code = ?failure.code,
                        message = %failure.message,
                        "watch stream broke; reconnecting"
                    );
                    if is_node_local(&failure) {
                        self.refused[self.endpoint] = Some(failure);
                        if let Some(err) = self.all_refused() {
                            return Err(err);
                        }
                    } else if decide(failure.class, CallKind::Read) == Decision::Return {
                        return Err(Error::Status {
                            code: failure.code,
                            message: failure.message,
                            endpoint: self.endpoint(),
                        });
                    }
                }
            }
        }
    }

    /// The position of the last event delivered, or the one the watch started after (for a watch
    /// from now: the answering node's applied log index). Pass it to [`Client::watch`] to resume
    /// in a later process.
    pub fn position(&self) -> Option<EventPosition> {
        self.after.map(|(index, seq)| EventPosition { index, seq })
    }

    /// The endpoint the stream currently comes from (or came from last).
    pub fn endpoint(&self) -> String {
        self.client.uri(self.endpoint)
    }

    /// How many times the watch has reconnected.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// The watch as a [`futures::Stream`]: the events, and after an error that error as the
    /// last item.
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = Result<JobEventMessage, Error>> + Send + 'static {
        futures::stream::unfold(Some(self), |state| async move {
            let mut watch = state?;
            match watch.next().await {
                Ok(event) => Some((Ok(event), Some(watch))),
                Err(err) => Some((Err(err), None)),
            }
        })
    }

    /// Reconnects after a broken stream, starting with the endpoint after the one that broke.
    async fn reconnect(&mut self) -> Result<(), Error> {
        self.drops_since_event = self.drops_since_event.saturating_add(1);
        if self.drops_since_event > 1 {
            let delay_ms = backoff_delay_ms(
                &self.client.inner.options,
                self.drops_since_event - 2,
                rand::random::<f64>(),
            );
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        self.reconnects += 1;
        let next = (self.endpoint + 1) % self.client.inner.endpoints.len();
        self.connect(next).await
    }

    /// Opens a stream on the first endpoint, from `start` on, that serves one, within the retry
    /// budget.
    async fn connect(&mut self, start: usize) -> Result<(), Error> {
        let options = self.client.inner.options.clone();
        let count = self.client.inner.endpoints.len();
        let backstop_ms = options.call_timeout_ms + options.connect_timeout_ms;
        let started = Instant::now();
        let mut index = start;
        let mut attempts: u32 = 0;
        loop {
            attempts += 1;
            let channel = self.client.inner.endpoints[index].channel.clone();
            let failure = match tokio::time::timeout(
                Duration::from_millis(backstop_ms),
                self.open_on(channel),
            )
            .await
            {
                Ok(Ok(stream)) => {
                    self.stream = Some(stream);
                    self.endpoint = index;
                    return Ok(());
                }
                Ok(Err(status)) => Failure::from_status(&status),
                Err(_) => Failure::timed_out(backstop_ms),
            };
            self.endpoint = index;
            if is_node_local(&failure) {
                self.refused[index] = Some(failure.clone());
                if let Some(err) = self.all_refused() {
                    return Err(err);
                }
            } else if decide(failure.class, CallKind::Read) == Decision::Return {
                return Err(Error::Status {
                    code: failure.code,
                    message: failure.message,
                    endpoint: self.endpoint(),
                });
            }
            let delay_ms = backoff_delay_ms(&options, attempts - 1, rand::random::<f64>());
            let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            if !may_retry(&options, attempts, elapsed_ms, delay_ms) {
                // A node that said the position is gone is a better answer than the last
                // unreachable one.
                if let Some(err) = self.refusal_error() {
                    return Err(err);
                }
                return Err(Error::RetriesExhausted {
                    code: failure.code,
                    message: failure.message,
                    endpoint: self.endpoint(),
                    attempts,
                    elapsed_ms,
                });
            }
            tracing::debug!(
                endpoint = %self.endpoint(),
                code = ?failure.code,
                message = %failure.message,
                attempts,
                delay_ms,
                "watch: trying the next endpoint"
            );
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            index = (index + 1) % count;
        }
    }

    /// One try on one node: anchor "from now" at the node's applied index if no position is
    /// known yet, then open the stream after the position.
    async fn open_on(
        &mut self,
        channel: crate::client::Transport,
    ) -> Result<Streaming<JobEventMessage>, Status> {
        let after = match self.after {
            Some(after) => after,
            None => {
                let timeout = Duration::from_millis(self.client.inner.options.call_timeout_ms);
                // From now, and no earlier than what this client has seen.
                let head = CallHead {
                    min_index: self.client.seen_index(),
                    ..CallHead::timeout(timeout)
                };
                let reply = ClusterClient::new(channel.clone())
                    .status(with_timeout(StatusRequest {}, head))
                    .await?;
                self.client.saw(reply.metadata());
                let status = reply.into_inner();
                // Every event of entries up to the applied index happened before "now".
                let anchor = (status.applied_index, u32::MAX);
                self.after = Some(anchor);
                anchor
            }
        };
        let (job_id, queue) = match &self.scope {
            WatchScope::All => (0, String::new()),
            WatchScope::Job(id) => (*id, String::new()),
            WatchScope::Queue(queue) => (0, queue.clone()),
        };
        // No grpc-timeout: the stream is meant to stay open. The caller bounds the wait for
        // the response headers.
        let request = WatchRequest {
            job_id,
            queue,
            after: Some(EventPosition {
                index: after.0,
                seq: after.1,
            }),
        };
        Ok(JobsClient::new(channel).watch(request).await?.into_inner())
    }

    /// The error to return once every endpoint refused the resume position.
    fn all_refused(&self) -> Option<Error> {
        if self.refused.iter().all(Option::is_some) {
            self.refusal_error()
        } else {
            None
        }
    }

    /// The error of a node-local refusal, preferring a lost position.
    fn refusal_error(&self) -> Option<Error> {
        let refusals = || {
            self.refused
                .iter()
                .enumerate()
                .filter_map(|(i, r)| Some((i, r.as_ref()?)))
        };
        let (index, failure) = refusals()
            .find(|(_, f)| f.code == Code::OutOfRange)
            .or_else(|| refusals().next())?;
        let endpoint = self.client.uri(index);
        Some(if failure.code == Code::OutOfRange {
            let (index, seq) = self.after.unwrap_or((0, 0));
            Error::WatchPositionLost {
                index,
                seq,
                message: failure.message.clone(),
                endpoint,
            }
        } else {
            Error::Status {
                code: failure.code,
                message: failure.message.clone(),
                endpoint,
            }
        })
    }
}

/// A refusal that another node may not give: the position is no longer retained on this node
/// (nodes that started at different times keep different windows), or this node already serves
/// its maximum of watch streams.
fn is_node_local(failure: &Failure) -> bool {
    matches!(failure.code, Code::OutOfRange | Code::ResourceExhausted)
        && failure.class == crate::retry::Class::Final
}
