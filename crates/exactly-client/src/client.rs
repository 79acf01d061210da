//! The [`Client`]: one lazy gRPC channel per endpoint, a bounded retry loop over them, and one
//! typed method per call of the public API.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly_proto::v1::cluster_client::ClusterClient;
use exactly_proto::v1::dead_letters_client::DeadLettersClient;
use exactly_proto::v1::jobs_client::JobsClient;
use exactly_proto::v1::queues_client::QueuesClient;
use exactly_proto::v1::schedules_client::SchedulesClient;
use exactly_proto::v1::tokens_client::TokensClient;
use exactly_proto::v1::{
    AddScheduleRequest, AuditRecord, AuditRequest, CancelRequest, CancelResult,
    ConfigureQueueRequest, DeadLetterFilter, DrainRequest, DrainResponse, GetRequest,
    IssueTokenRequest, JoinRequest, JoinResponse, ListQueuesRequest, ListRequest, ListResponse,
    ListSchedulesRequest, ListTokensRequest, QueueInfo, RemoveRequest, RemoveScheduleRequest,
    RevokeTokenRequest, ScheduleInfo, SetSchedulePausedRequest, StatusRequest, SubmitRequest,
    TokenInfo,
};
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::retry::{decide, may_retry, retry_delay_ms, CallKind, Class, Decision, Failure};
use crate::watch::{Watch, WatchScope};
use crate::{ClientOptions, Error, EventPosition, Job, JobSpec, StatusResponse};

/// Most jobs one Submit request may carry; the server rejects larger batches with
/// `RESOURCE_EXHAUSTED`.
pub const SUBMIT_JOBS_MAX: usize = 1_000;

/// Most job ids one Cancel request may carry; the server rejects more with `RESOURCE_EXHAUSTED`.
pub const CANCEL_JOBS_MAX: usize = 1_000;

/// Most dead letters one Redrive or Purge call moves; call again for more.
pub const DEAD_LETTERS_PER_CALL_MAX: usize = 1_000;

/// Most jobs one List call returns.
pub const LIST_LIMIT_MAX: u32 = 1_000;

/// Most endpoints one client accepts; a cluster has a handful of nodes, not hundreds.
pub const ENDPOINTS_MAX: usize = 64;

/// A handle to an exactly cluster. Cheap to clone: clones share the channels.
///
/// Any node accepts any call, so the client sends each call to the endpoint that answered last and
/// moves to the next one when a try fails in a retryable way.
#[derive(Clone, Debug)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) endpoints: Vec<Node>,
    /// Index of the endpoint that answered last; calls start there.
    pub(crate) preferred: AtomicUsize,
    pub(crate) options: ClientOptions,
    /// The largest log index any reply carried (`exactly-index`): every later read asks for at
    /// least this much (`exactly-min-index`), so it sees what this client saw, on any node.
    pub(crate) seen_index: AtomicU64,
    /// One permit per call in flight (`ClientOptions::in_flight_max`).
    pub(crate) in_flight: tokio::sync::Semaphore,
}

#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) uri: String,
    pub(crate) channel: Transport,
}

/// One job of a Submit as the cluster answered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// The job's id: a new job's, or the original job's when `existing` is true.
    pub id: u64,
    /// The idempotency key the job was submitted with: the caller's, or one the client chose.
    pub idempotency_key: String,
    /// True when the key was seen before and no job was created: `id` is the original job.
    pub existing: bool,
}

/// The answer to [`Client::submit_detailed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submission {
    /// One entry per submitted job, in request order.
    pub jobs: Vec<Submitted>,
    /// True when the request was sent again after a try whose outcome was unknown (the
    /// connection broke, the deadline passed). That earlier try may have created some of the
    /// jobs, which then show `existing: true` although no one else submitted them.
    pub resent_after_unknown_outcome: bool,
}

impl Submission {
    /// The job ids, in request order.
    pub fn ids(&self) -> Vec<u64> {
        self.jobs.iter().map(|j| j.id).collect()
    }
}

/// Gives every job without an idempotency key a fresh random (v4) UUID as its key, and leaves
/// keys the caller set alone. [`Client::submit`] does this itself; call it first when you want to
/// keep the keys, for example to resubmit the very same jobs after an
/// [`Error::UnknownOutcome`].
pub fn assign_idempotency_keys(jobs: &mut [JobSpec]) {
    for job in jobs.iter_mut().filter(|j| j.idempotency_key.is_empty()) {
        job.idempotency_key = uuid::Uuid::new_v4().to_string();
    }
}

/// The per-job outcome of a [`Client::cancel`] as a gRPC code, read from
/// [`CancelResult::code`](exactly_proto::v1::CancelResult).
pub trait CancelResultExt {
    /// `Code::Ok` if the job was cancelled, `NotFound` if no such job exists,
    /// `FailedPrecondition` if it had finished already. A result with an error but no code (a
    /// server from before the field existed) is `Code::Unknown`.
    fn status_code(&self) -> tonic::Code;

    /// Whether the job was cancelled by this call.
    fn cancelled(&self) -> bool {
        self.status_code() == tonic::Code::Ok
    }
}

impl CancelResultExt for CancelResult {
    fn status_code(&self) -> tonic::Code {
        match tonic::Code::from_i32(self.code) {
            tonic::Code::Ok if !self.error.is_empty() => tonic::Code::Unknown,
            code => code,
        }
    }
}

/// A successful call: the answer, the endpoint that gave it, and whether a try before it may
/// have been applied.
pub(crate) struct Answer<T> {
    pub value: T,
    pub endpoint: usize,
    pub after_unknown_outcome: bool,
}

impl Client {
    /// Creates a client for the given endpoints with default [`ClientOptions`].
    ///
    /// Endpoints are URIs such as `http://127.0.0.1:7101`; a bare `host:port` gets `http://`.
    /// Channels are lazy: nothing is dialled until the first call, so this succeeds even while the
    /// cluster is down. Must be called within a Tokio runtime.
    pub fn connect(endpoints: Vec<String>) -> Result<Client, Error> {
        Client::connect_with(endpoints, ClientOptions::default())
    }

    /// Like [`Client::connect`], with explicit timeouts and retry limits.
    pub fn connect_with(endpoints: Vec<String>, options: ClientOptions) -> Result<Client, Error> {
        let options = options.validate()?;
        if endpoints.is_empty() {
            return Err(Error::Config("no endpoints given".into()));
        }
        if endpoints.len() > ENDPOINTS_MAX {
            return Err(Error::Config(format!(
                "{} endpoints given, at most {ENDPOINTS_MAX} are accepted",
                endpoints.len()
            )));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config(
                "Client::connect must be called within a Tokio runtime".into(),
            ));
        }
        let authorize = Authorize::new(options.token.as_ref())?;
        let mut nodes = Vec::with_capacity(endpoints.len());
        for raw in endpoints {
            let uri =
                normalize_endpoint(&raw, options.ca_pem.is_some() || options.identity.is_some());
            let mut endpoint = Endpoint::from_shared(uri.clone())
                .map_err(|err| Error::Config(format!("endpoint {raw:?}: {err}")))?
                .connect_timeout(Duration::from_millis(options.connect_timeout_ms))
                .http2_keep_alive_interval(Duration::from_millis(options.keepalive_interval_ms))
                .keep_alive_timeout(Duration::from_millis(options.keepalive_timeout_ms))
                .tcp_nodelay(true);
            if uri.starts_with("https://") {
                let mut tls = match &options.ca_pem {
                    Some(pem) => tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
                    None => tonic::transport::ClientTlsConfig::new().with_webpki_roots(),
                };
                if let Some(identity) = &options.identity {
                    tls = tls.identity(tonic::transport::Identity::from_pem(
                        &identity.cert_pem,
                        &identity.key_pem,
                    ));
                }
                endpoint = endpoint
                    .tls_config(tls)
                    .map_err(|err| Error::Config(format!("endpoint {raw:?}: TLS: {err}")))?;
            } else if options.identity.is_some() {
                return Err(Error::Config(format!(
                    "endpoint {uri}: a client certificate is presented only over https:// \
                     (give --ca, or an https:// endpoint)"
                )));
            } else if options.token.is_some() && !is_loopback_uri(&uri) {
                return Err(Error::Config(format!(
                    "endpoint {uri}: a token is sent only over https:// (or to a loopback \
                     address), never in the clear"
                )));
            }
            nodes.push(Node {
                uri,
                channel: tonic::service::interceptor::InterceptedService::new(
                    endpoint.connect_lazy(),
                    authorize.clone(),
                ),
            });
        }
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints: nodes,
                preferred: AtomicUsize::new(0),
                in_flight: tokio::sync::Semaphore::new(options.in_flight_max as usize),
                options,
                seen_index: AtomicU64::new(0),
            }),
        })
    }

    /// The endpoints this client uses, normalised, in the order given.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner.endpoints.iter().map(|n| n.uri.clone()).collect()
    }

    /// The options this client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// The largest log index this client has seen in a reply: its reads reflect at least this
    /// position (read-your-writes). 0 before the first reply.
    pub fn seen_index(&self) -> u64 {
        self.inner.seen_index.load(Ordering::Acquire)
    }

    /// Submits `jobs` in one request and returns their ids in request order. All or nothing: either
    /// every job is accepted (durable on a quorum) or none is. See [`Client::submit_detailed`] for
    /// the retry rules and for which ids name jobs that existed before.
    pub async fn submit(&self, jobs: Vec<JobSpec>) -> Result<Vec<u64>, Error> {
        Ok(self.submit_detailed(jobs).await?.ids())
    }

    /// Submits `jobs` in one request and reports, per job, its id, its idempotency key and
    /// whether the key was seen before (`existing`: no job was created, the id is the original
    /// job's). All or nothing: either every job is accepted (durable on a quorum) or none is.
    ///
    /// At most [`SUBMIT_JOBS_MAX`] jobs per call; split larger sets yourself, knowing that each
    /// request is then all-or-nothing on its own.
    ///
    /// # Idempotency keys and retries
    ///
    /// Every job without an idempotency key gets a fresh random UUID as its key, chosen once
    /// before the first try ([`assign_idempotency_keys`]). A repeat of a key returns the original
    /// job and creates nothing, so this call retries on the next endpoint after *any* transient
    /// failure, including those after which the first try may have committed (the connection
    /// broke, `DEADLINE_EXCEEDED`, `UNKNOWN`), reusing the same keys: each job exists at most
    /// once. If such a try may have committed, [`Submission::resent_after_unknown_outcome`] says
    /// so. If the retry budget runs out after one, the error is [`Error::UnknownOutcome`].
    ///
    /// A key is remembered by the cluster for its retention window (24 h by default). The same
    /// key with a different queue, kind or payload is refused with `ALREADY_EXISTS`.
    pub async fn submit_detailed(&self, mut jobs: Vec<JobSpec>) -> Result<Submission, Error> {
        assign_idempotency_keys(&mut jobs);
        let keys: Vec<String> = jobs.iter().map(|j| j.idempotency_key.clone()).collect();
        let request = SubmitRequest { jobs };
        let answer = self
            .call(CallKind::IdempotentWrite, |channel, timeout| {
                let request = with_timeout(request.clone(), timeout);
                async move { JobsClient::new(channel).submit(request).await }
            })
            .await?;
        let response = answer.value;
        if response.job_ids.len() != keys.len() {
            return Err(Error::Protocol {
                message: format!(
                    "submitted {} jobs but got {} ids",
                    keys.len(),
                    response.job_ids.len()
                ),
                endpoint: self.uri(answer.endpoint),
            });
        }
        // A server that predates idempotency keys sends no `existing` flags: none existed.
        let mut existing = response.existing;
        existing.resize(keys.len(), false);
        let jobs = response
            .job_ids
            .into_iter()
            .zip(keys)
            .zip(existing)
            .map(|((id, idempotency_key), existing)| Submitted {
                id,
                idempotency_key,
                existing,
            })
            .collect();
        Ok(Submission {
            jobs,
            resent_after_unknown_outcome: answer.after_unknown_outcome,
        })
    }

    /// Submits one job and returns its id. Same rules as [`Client::submit_detailed`].
    pub async fn submit_one(&self, job: JobSpec) -> Result<u64, Error> {
        let ids = self.submit(vec![job]).await?;
        // `submit_detailed` checked that there is exactly one id per job.
        Ok(ids[0])
    }

    /// Returns one job with its attempts. `NOT_FOUND` if the cluster does not know the id.
    /// Retried on every transient failure: reading twice is harmless.
    pub async fn get(&self, job_id: u64) -> Result<Job, Error> {
        let answer = self
            .call(CallKind::Read, |channel, timeout| {
                let request = with_timeout(
                    GetRequest {
                        job_id,
                        ..Default::default()
                    },
                    timeout,
                );
                async move { JobsClient::new(channel).get(request).await }
            })
            .await?;
        answer.value.job.ok_or_else(|| Error::Protocol {
            message: format!("Get of job {job_id} returned no job"),
            endpoint: self.uri(answer.endpoint),
        })
    }

    /// Like [`Client::get`], with the job's payload while the cluster holds it: while the job
    /// is pending or running, and while it is a dead letter (`None` once it succeeded or was
    /// cancelled: the payload is dropped then).
    pub async fn get_with_payload(&self, job_id: u64) -> Result<(Job, Option<Vec<u8>>), Error> {
        let answer = self
            .call(CallKind::Read, |channel, timeout| {
                let request = with_timeout(
                    GetRequest {
                        job_id,
                        include_payload: true,
                    },
                    timeout,
                );
                async move { JobsClient::new(channel).get(request).await }
            })
            .await?;
        let exactly_proto::v1::GetResponse { job, payload } = answer.value;
        let job = job.ok_or_else(|| Error::Protocol {
            message: format!("Get of job {job_id} returned no job"),
            endpoint: self.uri(answer.endpoint),
        })?;
        Ok((job, payload))
    }

    /// Lists jobs in id order, filtered, one page at a time (at most [`LIST_LIMIT_MAX`]). Pass
    /// the answer's `next_after_id` as the next request's `after_id`; it is 0 after the last
    /// page. A page may hold fewer jobs than `limit` and still not be the last: the server bounds
    /// how many jobs one call looks at.
    pub async fn list(&self, request: ListRequest) -> Result<ListResponse, Error> {
        let answer = self
            .call(CallKind::Read, |channel, timeout| {
                let request = with_timeout(request.clone(), timeout);
                async move { JobsClient::new(channel).list(request).await }
            })
            .await?;
        Ok(answer.value)
    }

    /// Cancels jobs (at most [`CANCEL_JOBS_MAX`] per call): pending ones end at once, running
    /// ones end now and their handler is stopped. Returns one result per job; a job that could
    /// not be cancelled carries an error and a code ([`CancelResultExt::status_code`]:
    /// `NotFound` for an unknown job, `FailedPrecondition` for a finished one), and the others
    /// are still cancelled.
    ///
    /// Retried only when a try provably was not applied: a repeat of an applied cancel would
    /// report the jobs as already finished. Otherwise [`Error::UnknownOutcome`].
    pub async fn cancel(&self, job_ids: Vec<u64>) -> Result<Vec<CancelResult>, Error> {
        let request = CancelRequest { job_ids };
        let answer = self
            .call(CallKind::Write, |channel, timeout| {
                let request = with_timeout(request.clone(), timeout);
                async move { JobsClient::new(channel).cancel(request).await }
            })
            .await?;
        Ok(answer.value.results)
    }

    /// Opens a stream of job state changes: of one job, one queue, or every job, from `after`
    /// (a position from an earlier event) or, with `None`, from now. See [`Watch`] for how it
    /// survives disconnects.
    pub async fn watch(
        &self,
        scope: WatchScope,
        after: Option<EventPosition>,
    ) -> Result<Watch, Error> {
        Watch::open(self.clone(), scope, after).await
    }

    /// Runs matching dead letters again (attempts reset, history kept) and returns their ids. At
    /// most [`DEAD_LETTERS_PER_CALL_MAX`] per call (`limit`); call again while a call returns a
    /// full batch. The filter needs `job_ids`, `queue` or `kind`, or else `all: true` to act on
    /// every dead letter; an empty filter (and `all` with a filter) is refused with
    /// `INVALID_ARGUMENT` and changes nothing.
    ///
    /// Retried only when a try provably was not applied (a repeat could redrive jobs that died
    /// again meanwhile); otherwise [`Error::UnknownOutcome`].
    pub async fn redrive(&self, filter: DeadLetterFilter) -> Result<Vec<u64>, Error> {
        let answer = self
            .call(CallKind::Write, |channel, timeout| {
                let request = with_timeout(filter.clone(), timeout);
                async move { DeadLettersClient::new(channel).redrive(request).await }
            })
            .await?;
        Ok(answer.value.job_ids)
    }

    /// Deletes matching dead letters and their payloads and returns their ids. Batching and
    /// retries as for [`Client::redrive`].
    pub async fn purge(&self, filter: DeadLetterFilter) -> Result<Vec<u64>, Error> {
        let answer = self
            .call(CallKind::Write, |channel, timeout| {
                let request = with_timeout(filter.clone(), timeout);
                async move { DeadLettersClient::new(channel).purge(request).await }
            })
            .await?;
        Ok(answer.value.job_ids)
    }

    /// Changes a queue's settings (fields left unset keep their value) and returns the queue.
    /// The settings are absolute values, so a repeat has the same effect: retried on every
    /// transient failure.
    pub async fn configure_queue(
        &self,
        request: ConfigureQueueRequest,
    ) -> Result<QueueInfo, Error> {
        let answer = self
            .call(CallKind::IdempotentWrite, |channel, timeout| {
                let request = with_timeout(request.clone(), timeout);
                async move { QueuesClient::new(channel).configure(request).await }
            })
            .await?;
        Ok(answer.value)
    }

    /// Every queue with jobs or settings.
    pub async fn list_queues(&self) -> Result<Vec<QueueInfo>, Error> {
        let answer = self
            .call(CallKind::Read, |channel, timeout| {
                let request = with_timeout(ListQueuesRequest {}, timeout);
                async move { QueuesClient::new(channel).list(request).await }
            })
            .await?;
        Ok(answer.value.queues)
    }

    /// Adds a recurring cron schedule (or replaces one of the same name with `replace`) and
    /// returns it. `ALREADY_EXISTS` if the name is taken and `replace` is false.
    ///
    /// Retried only when a try provably was not applied (a repeat of an applied add would answer
    /// `ALREADY_EXISTS`); otherwise [`Error::UnknownOutcome`]: check with
    /// [`Client::list_schedules`].
    pub async fn add_schedule(&self, request: AddScheduleRequest) -> Result<ScheduleInfo, Error> {
        let answer = self
            .call(CallKind::Write, |channel, timeout| {
                let request = with_timeout(request.clone(), timeout);
                async move { SchedulesClient::new(channel).add(request).await }
            })
            .await?;
        Ok(answer.value)
    }

    /// Every cron schedule.
    pub async fn list_schedules(&self) -> Result<Vec<ScheduleInfo>, Error> {
        let answer = self
            .call(CallKind::Read, |channel, timeout| {
                let request = with_timeout(ListSchedulesRequest {}, timeout);
                async move { SchedulesClient::new(channel).list(request).await }
            })
            .await?;
        Ok(answer.value.schedules)
    }

    /// Removes a cron schedule; jobs it already fired are not touched. `NOT_FOUND` if there is
    /// no such schedule. Retried like [`Client::add_schedule`].
    pub async fn remove_schedule(&self, name: &str) -> Result<(), Error> {
        let request = RemoveScheduleRequest {
            name: name.to_string(),
        };
        self.call(CallKind::Write, |channel, timeout| {
            let request = with_timeout(request.clone(), timeout);
            async move { SchedulesClient::new(channel).remove(request).await }
        })
        .await?;
        Ok(())
    }

    /// Pauses (`true`) or resumes (`false`) a cron schedule and returns it. Retried on every
    /// transient failure: setting the same state twice is harmless.
    pub async fn set_schedule_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<ScheduleInfo, Error> {
        let request = SetSchedulePausedRequest {
            name: name.to_string(),
            paused,
        };
        let answer = self
            .call(CallKind::IdempotentWrite, |channel, timeout| {
                let request = with_timeout(request.clone(), timeout);
                async move { SchedulesClient::new(channel).set_paused(request).await }
            })
            .await?;
        Ok(answer.value)
    }

    /// The audit trail (operators' and administrators' writes, with the token that made each),
    /// oldest first: the newest `limit` records (`after_index` 0), or those after a log index.
    /// Needs the admin scope.
    pub async fn audit(&self, after_index: u64, limit: u32) -> Result<Vec<AuditRecord>, Error> {
        let answer = self
            .call(CallKind::Read, |channel, timeout| {
                let request = with_timeout(AuditRequest { after_index, limit }, timeout);
                async move { ClusterClient::new(channel).audit(request).await }
            })
            .await?;
        Ok(answer.value.records)
    }

    /// Asks every endpoint, at once, whether it is ready (the standard gRPC health check,
    /// `grpc.health.v1.Health/Check`, which a node answers `SERVING` exactly when its `/readyz`
    /// says ready). One answer per endpoint, in the order given: `Ok(true)` serving,
    /// `Ok(false)` not serving, `Err` no answer within the call timeout. Not retried: it
    /// reports what each node says now. Needs no token.
    pub async fn health(&self) -> Vec<(String, Result<bool, Error>)> {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
        let timeout = Duration::from_millis(self.inner.options.call_timeout_ms);
        let checks = self.inner.endpoints.iter().map(|node| async move {
            let mut request = tonic::Request::new(HealthCheckRequest::default());
            request.set_timeout(timeout);
            let answer = tokio::time::timeout(
                timeout,
                HealthClient::new(node.channel.clone()).check(request),
            )
            .await;
            let failed = |code: tonic::Code, message: String| Error::Status {
                code,
                message,
                endpoint: node.uri.clone(),
            };
            let result = match answer {
                Ok(Ok(reply)) => Ok(reply.into_inner().status() == ServingStatus::Serving),
                Ok(Err(status)) => Err(failed(status.code(), status.message().to_string())),
                Err(_) => Err(failed(
                    tonic::Code::DeadlineExceeded,
                    format!("no health answer within {timeout:?}"),
                )),
            };
            (node.uri.clone(), result)
        });
        futures::future::join_all(checks).await
    }

    /// Returns the cluster's status as the answering node sees it. Retried on every transient
    /// failure.
    pub async fn status(&self) -> Result<StatusResponse, Error> {
        let answer = self
            .call(CallKind::Read, |channel, timeout| {
                let request = with_timeout(StatusRequest {}, timeout);
                async move { ClusterClient::new(channel).status(request).await }
            })
            .await?;
        Ok(answer.value)
    }

    /// Drains node `node_id`: it takes no new jobs, its running jobs may finish for `deadline`,
    /// then they are cancelled and run elsewhere; once it runs nothing it leaves the cluster.
    /// Returns once the drain is committed (watch [`Client::status`] for its progress).
    /// Retried on every transient failure: repeating a drain only moves its deadline.
    pub async fn drain(&self, node_id: u64, deadline: Duration) -> Result<DrainResponse, Error> {
        let deadline_ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
        let answer = self
            .call(CallKind::Read, |channel, timeout| {
                let request = with_timeout(
                    DrainRequest {
                        node_id,
                        deadline_ms,
                    },
                    timeout,
                );
                async move { ClusterClient::new(channel).drain(request).await }
            })
            .await?;
        Ok(answer.value)
    }

    /// Removes node `node_id` now (typically a dead node): a drain without a deadline, after
    /// which its id is refused for good. A dead node's jobs move once its lease expires.
    /// Retried on every transient failure: removing twice is harmless.
    pub async fn remove(&self, node_id: u64) -> Result<DrainResponse, Error> {
        let answer = self
            .call(CallKind::Read, |channel, timeout| {
                let request = with_timeout(RemoveRequest { node_id }, timeout);
                async move { ClusterClient::new(channel).remove(request).await }
            })
            .await?;
        Ok(answer.value)
    }

    /// Admits node `node_id`, reachable at `addr`, that was started without `--join`. Retried on
    /// every transient failure: admitting a member again changes nothing.
    pub async fn join(&self, node_id: u64, addr: String) -> Result<JoinResponse, Error> {
        let answer = self
            .call(CallKind::Read, |channel, timeout| {
                let request = with_timeout(
                    JoinRequest {
                        node_id,
                        addr: addr.clone(),
                    },
                    timeout,
                );
                async move { ClusterClient::new(channel).join(request).await }
            })
            .await?;
        Ok(answer.value)
    }

    /// Issues a bearer token named `name` with `scopes` (`submit`, `submit:<queue>`, `read`,
    /// `operate`, `admin`), valid until `expires_at_ms` (ms since the Unix epoch; `None`:
    /// never). Only the token's SHA-256 `digest` is sent (make the token with
    /// [`crate::token::generate`]); every node admits the token once it applied the issue.
    /// Needs the admin scope. Retried only when a try provably was not applied (a repeat
    /// would be refused as a duplicate).
    pub async fn issue_token(
        &self,
        name: &str,
        digest: [u8; 32],
        scopes: &[String],
        expires_at_ms: Option<u64>,
    ) -> Result<TokenInfo, Error> {
        let answer = self
            .call(CallKind::Write, |channel, timeout| {
                let request = with_timeout(
                    IssueTokenRequest {
                        name: name.to_string(),
                        sha256: digest.to_vec(),
                        scopes: scopes.to_vec(),
                        expires_at_ms: expires_at_ms.unwrap_or(0),
                    },
                    timeout,
                );
                async move { TokensClient::new(channel).issue(request).await }
            })
            .await?;
        Ok(answer.value)
    }

    /// Revokes the issued token `name`: every node refuses it once it applied the revocation.
    /// Needs the admin scope.
    pub async fn revoke_token(&self, name: &str) -> Result<(), Error> {
        self.call(CallKind::Write, |channel, timeout| {
            let request = with_timeout(
                RevokeTokenRequest {
                    name: name.to_string(),
                },
                timeout,
            );
            async move { TokensClient::new(channel).revoke(request).await }
        })
        .await?;
        Ok(())
    }

    /// The issued tokens and the answering node's configured ones (names, scopes, expiry; never
    /// digests). Needs the admin scope.
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, Error> {
        let answer = self
            .call(CallKind::Read, |channel, timeout| {
                let request = with_timeout(ListTokensRequest {}, timeout);
                async move { TokensClient::new(channel).list(request).await }
            })
            .await?;
        Ok(answer.value.tokens)
    }

    pub(crate) fn uri(&self, index: usize) -> String {
        self.inner.endpoints[index].uri.clone()
    }

    /// Runs one call with retries, returning the answer and the index of the endpoint that gave it.
    async fn call<T, F, Fut>(&self, kind: CallKind, mut attempt: F) -> Result<Answer<T>, Error>
    where
        F: FnMut(Transport, CallHead) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let inner = &*self.inner;
        // The semaphore is never closed, so acquiring only waits.
        let _permit = inner.in_flight.acquire().await.ok();
        let options = &inner.options;
        let call_timeout = Duration::from_millis(options.call_timeout_ms);
        // tonic enforces `call_timeout` once connected and `connect_timeout` while dialling; this
        // backstop only catches a try stuck somewhere neither covers.
        let backstop_ms = options.call_timeout_ms + options.connect_timeout_ms;
        let started = Instant::now();
        let count = inner.endpoints.len();
        let mut index = inner.preferred.load(Ordering::Relaxed) % count;
        let mut attempts: u32 = 0;
        // Whether an earlier try may have been applied: then a later success may find its
        // effect, and giving up leaves the outcome unknown.
        let mut maybe_applied = false;
        loop {
            let node = &inner.endpoints[index];
            attempts += 1;
            let head = CallHead {
                timeout: call_timeout,
                min_index: inner.seen_index.load(Ordering::Acquire),
                linearizable: options.linearizable_reads && kind == CallKind::Read,
            };
            let try_ = attempt(node.channel.clone(), head);
            let failure = match tokio::time::timeout(Duration::from_millis(backstop_ms), try_).await
            {
                Ok(Ok(response)) => {
                    inner.preferred.store(index, Ordering::Relaxed);
                    self.saw(response.metadata());
                    return Ok(Answer {
                        value: response.into_inner(),
                        endpoint: index,
                        after_unknown_outcome: maybe_applied,
                    });
                }
                Ok(Err(status)) => Failure::from_status(&status),
                Err(_) => Failure::timed_out(backstop_ms),
            };
            match decide(failure.class, kind) {
                Decision::Return => {
                    return Err(Error::Status {
                        code: failure.code,
                        message: failure.message,
                        endpoint: node.uri.clone(),
                    })
                }
                Decision::UnknownOutcome => {
                    return Err(Error::UnknownOutcome {
                        code: failure.code,
                        message: failure.message,
                        endpoint: node.uri.clone(),
                    })
                }
                Decision::Retry => {}
            }
            // The next call starts elsewhere too, even if this one gives up now (with a retry
            // budget of one try, a node that went down was otherwise asked first by every call
            // for good). Only if no other call moved the preference meanwhile.
            let _ = inner.preferred.compare_exchange(
                index,
                (index + 1) % count,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            maybe_applied |= failure.class == Class::MaybeApplied;
            let delay_ms = retry_delay_ms(options, attempts - 1, &failure, rand::random::<f64>());
            let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            if !may_retry(options, attempts, elapsed_ms, delay_ms) {
                if maybe_applied && kind == CallKind::IdempotentWrite {
                    return Err(Error::UnknownOutcome {
                        code: failure.code,
                        message: format!(
                            "{} (gave up after {attempts} attempts in {elapsed_ms} ms)",
                            failure.message
                        ),
                        endpoint: node.uri.clone(),
                    });
                }
                return Err(Error::RetriesExhausted {
                    code: failure.code,
                    message: failure.message,
                    endpoint: node.uri.clone(),
                    attempts,
                    elapsed_ms,
                });
            }
            tracing::debug!(
                endpoint = %node.uri,
                code = ?failure.code,
                message = %failure.message,
                attempts,
                delay_ms,
                "retrying on the next endpoint"
            );
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            index = (index + 1) % count;
        }
    }
}

/// Response header: the log index a reply reflects.
pub const INDEX_HEADER: &str = "exactly-index";
/// Request header: the smallest log index a read must reflect.
pub const MIN_INDEX_HEADER: &str = "exactly-min-index";
/// Request header: `linearizable` for a linearizable read.
pub const READ_HEADER: &str = "exactly-read";

/// What every try of a call sends besides its message.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallHead {
    /// The deadline, sent as `grpc-timeout`.
    pub timeout: Duration,
    /// The largest log index the client has seen (0: none yet).
    pub min_index: u64,
    /// Ask for a linearizable read.
    pub linearizable: bool,
}

impl CallHead {
    /// A head with a deadline and nothing else.
    pub(crate) fn timeout(timeout: Duration) -> Self {
        Self {
            timeout,
            min_index: 0,
            linearizable: false,
        }
    }
}

/// Wraps a message in a request that carries the deadline to the server as `grpc-timeout`, and
/// the consistency headers.
pub(crate) fn with_timeout<M>(message: M, head: CallHead) -> tonic::Request<M> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(head.timeout);
    if head.min_index > 0 {
        request.metadata_mut().insert(
            MIN_INDEX_HEADER,
            tonic::metadata::MetadataValue::from(head.min_index),
        );
    }
    if head.linearizable {
        request.metadata_mut().insert(
            READ_HEADER,
            tonic::metadata::MetadataValue::from_static("linearizable"),
        );
    }
    request
}

impl Client {
    /// Remembers the log index a reply carried.
    pub(crate) fn saw(&self, metadata: &tonic::metadata::MetadataMap) {
        let index = metadata
            .get(INDEX_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(index) = index {
            self.inner.seen_index.fetch_max(index, Ordering::AcqRel);
        }
    }
}

/// Adds `http://` (`https://` when a CA is given) to an endpoint given as a bare `host:port`.
pub(crate) fn normalize_endpoint(raw: &str, tls: bool) -> String {
    let trimmed = raw.trim();
    if trimmed.contains("://") {
        trimmed.to_string()
    } else if tls {
        format!("https://{trimmed}")
    } else {
        format!("http://{trimmed}")
    }
}

/// Whether a plain endpoint is on this machine (`localhost`, 127.0.0.0/8, `[::1]`), where a
/// token may travel without TLS.
fn is_loopback_uri(uri: &str) -> bool {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A channel to one endpoint that adds the client's token to every request.
pub(crate) type Transport = tonic::service::interceptor::InterceptedService<Channel, Authorize>;

/// Adds `authorization: Bearer <token>` (marked sensitive) when the client has a token.
#[derive(Clone)]
pub(crate) struct Authorize(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Authorize {
    fn new(token: Option<&crate::Token>) -> Result<Self, Error> {
        let Some(token) = token else {
            return Ok(Self(None));
        };
        let mut value = tonic::metadata::MetadataValue::try_from(format!("Bearer {}", token.0))
            .map_err(|_| Error::Config("token: not a valid header value".into()))?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }
}

impl tonic::service::Interceptor for Authorize {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare host:port gets a scheme; a full URI is kept as given.
    #[test]
    fn endpoints_are_normalized() {
        assert_eq!(
            normalize_endpoint("127.0.0.1:7101", false),
            "http://127.0.0.1:7101"
        );
        assert_eq!(
            normalize_endpoint("127.0.0.1:7101", true),
            "https://127.0.0.1:7101"
        );
        assert_eq!(normalize_endpoint(" https://a:1 ", false), "https://a:1");
    }

    /// A token may go in the clear only to this machine.
    #[test]
    fn loopback_endpoints_are_recognised() {
        for yes in [
            "http://127.0.0.1:7101",
            "http://127.9.0.1:1",
            "http://localhost:7101",
            "http://[::1]:7101",
        ] {
            assert!(is_loopback_uri(yes), "{yes}");
        }
        for no in [
            "http://10.0.0.1:7101",
            "http://localhost.evil.com:7101",
            "http://node-1:7101",
            "http://[::2]:1",
            "http://127.0.0.1.nip.io:7101",
        ] {
            assert!(!is_loopback_uri(no), "{no}");
        }
    }

    /// A token is never sent to a remote plain-text endpoint.
    #[tokio::test]
    async fn a_token_is_refused_for_a_remote_plain_endpoint() {
        let options = ClientOptions {
            token: Some(crate::Token("exa_x".into())),
            ..ClientOptions::default()
        };
        let err = Client::connect_with(vec!["http://10.0.0.1:7101".into()], options.clone())
            .err()
            .unwrap();
        assert!(err.to_string().contains("never in the clear"), "{err}");
        assert!(Client::connect_with(vec!["127.0.0.1:7101".into()], options).is_ok());
    }

    /// An empty endpoint list is a configuration error, not a panic.
    #[tokio::test]
    async fn no_endpoints_is_config_error() {
        let err = Client::connect(vec![]).unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
    }

    /// Connecting outside a Tokio runtime is reported instead of panicking inside tonic.
    #[test]
    fn connect_outside_runtime_is_config_error() {
        let err = Client::connect(vec!["http://127.0.0.1:1".into()]).unwrap_err();
        assert!(err.to_string().contains("Tokio runtime"), "{err}");
    }

    /// An endpoint that is not a URI is rejected with the offending text.
    #[tokio::test]
    async fn bad_endpoint_is_config_error() {
        let err = Client::connect(vec!["http://bad host:1".into()]).unwrap_err();
        assert!(err.to_string().contains("bad host"), "{err}");
    }

    /// Jobs without a key get distinct v4 UUIDs, which pass the server's key rule (printable
    /// ASCII); a caller's key is kept as it is.
    #[test]
    fn missing_keys_become_uuids() {
        let mut jobs = vec![
            JobSpec::default(),
            JobSpec {
                idempotency_key: "order-17".into(),
                ..JobSpec::default()
            },
            JobSpec::default(),
        ];
        assign_idempotency_keys(&mut jobs);
        assert_eq!(jobs[1].idempotency_key, "order-17");
        for key in [&jobs[0].idempotency_key, &jobs[2].idempotency_key] {
            let uuid = uuid::Uuid::parse_str(key).expect("a UUID");
            assert_eq!(uuid.get_version_num(), 4, "{key}");
            // The server's rule for keys: 1..=256 bytes of printable ASCII, no space at either
            // end (hyphenated lowercase hex has no space at all).
            assert_eq!(key.len(), 36, "{key}");
            assert!(
                key.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'),
                "{key}"
            );
        }
        assert_ne!(jobs[0].idempotency_key, jobs[2].idempotency_key);
        // Assigning again changes nothing: the keys are chosen once.
        let before = jobs.clone();
        assign_idempotency_keys(&mut jobs);
        assert_eq!(jobs, before);
    }
}
