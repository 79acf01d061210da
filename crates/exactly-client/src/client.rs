//! The [`Client`]: one lazy gRPC channel per endpoint and a bounded retry loop over them.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly_proto::v1::cluster_client::ClusterClient;
use exactly_proto::v1::jobs_client::JobsClient;
use exactly_proto::v1::{
    DrainRequest, DrainResponse, GetRequest, JoinRequest, JoinResponse, RemoveRequest,
    StatusRequest, SubmitRequest,
};
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::retry::{backoff_delay_ms, decide, may_retry, CallKind, Decision, Failure};
use crate::{ClientOptions, Error, Job, JobSpec, StatusResponse};

/// Most jobs one Submit request may carry; the server rejects larger batches with
/// `RESOURCE_EXHAUSTED`.
pub const SUBMIT_JOBS_MAX: usize = 1_000;

/// Most endpoints one client accepts; a cluster has a handful of nodes, not hundreds.
pub const ENDPOINTS_MAX: usize = 64;

/// A handle to an exactly cluster. Cheap to clone: clones share the channels.
///
/// Any node accepts any call, so the client sends each call to the endpoint that answered last and
/// moves to the next one when a try fails in a retryable way.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoints: Vec<Node>,
    /// Index of the endpoint that answered last; calls start there.
    preferred: AtomicUsize,
    options: ClientOptions,
}

#[derive(Debug)]
struct Node {
    uri: String,
    channel: Channel,
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
        let mut nodes = Vec::with_capacity(endpoints.len());
        for raw in endpoints {
            let uri = normalize_endpoint(&raw);
            let endpoint = Endpoint::from_shared(uri.clone())
                .map_err(|err| Error::Config(format!("endpoint {raw:?}: {err}")))?
                .connect_timeout(Duration::from_millis(options.connect_timeout_ms))
                .tcp_nodelay(true);
            nodes.push(Node {
                uri,
                channel: endpoint.connect_lazy(),
            });
        }
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints: nodes,
                preferred: AtomicUsize::new(0),
                options,
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

    /// Submits `jobs` in one request and returns their ids in request order. All or nothing: either
    /// every job is accepted (durable on a quorum) or none is.
    ///
    /// At most [`SUBMIT_JOBS_MAX`] jobs per call; split larger sets yourself, knowing that each
    /// request is then all-or-nothing on its own.
    ///
    /// # Retries and duplicates
    ///
    /// A Submit is retried on another endpoint only when the failed try provably was not applied:
    /// the connection could not be established, the server refused the HTTP/2 stream, or the server
    /// answered `UNAVAILABLE` (which it does only before proposing the batch). Any other failure
    /// after the request may have been sent (the connection broke, the deadline passed) is returned
    /// as [`Error::UnknownOutcome`]: the jobs may or may not exist, and retrying could create them
    /// twice. Until Submit carries idempotency keys, resolving that is the caller's decision.
    pub async fn submit(&self, jobs: Vec<JobSpec>) -> Result<Vec<u64>, Error> {
        let expected = jobs.len();
        let request = SubmitRequest { jobs };
        let (response, at) = self
            .call(CallKind::Write, |channel, timeout| {
                let request = with_timeout(request.clone(), timeout);
                async move { JobsClient::new(channel).submit(request).await }
            })
            .await?;
        if response.job_ids.len() != expected {
            return Err(Error::Protocol {
                message: format!(
                    "submitted {expected} jobs but got {} ids",
                    response.job_ids.len()
                ),
                endpoint: self.uri(at),
            });
        }
        Ok(response.job_ids)
    }

    /// Submits one job and returns its id. Same retry rules as [`Client::submit`].
    pub async fn submit_one(&self, job: JobSpec) -> Result<u64, Error> {
        let ids = self.submit(vec![job]).await?;
        // `submit` checked that there is exactly one id per job.
        Ok(ids[0])
    }

    /// Returns one job with its attempts. `NOT_FOUND` if the cluster does not know the id.
    /// Retried on every transient failure: reading twice is harmless.
    pub async fn get(&self, job_id: u64) -> Result<Job, Error> {
        let (response, at) = self
            .call(CallKind::Read, |channel, timeout| {
                let request = with_timeout(GetRequest { job_id }, timeout);
                async move { JobsClient::new(channel).get(request).await }
            })
            .await?;
        response.job.ok_or_else(|| Error::Protocol {
            message: format!("Get of job {job_id} returned no job"),
            endpoint: self.uri(at),
        })
    }

    /// Returns the cluster's status as the answering node sees it. Retried on every transient
    /// failure.
    pub async fn status(&self) -> Result<StatusResponse, Error> {
        let (response, _) = self
            .call(CallKind::Read, |channel, timeout| {
                let request = with_timeout(StatusRequest {}, timeout);
                async move { ClusterClient::new(channel).status(request).await }
            })
            .await?;
        Ok(response)
    }

    /// Drains node `node_id`: it takes no new jobs, its running jobs may finish for `deadline`,
    /// then they are cancelled and run elsewhere; once it runs nothing it leaves the cluster.
    /// Returns once the drain is committed (watch [`Client::status`] for its progress).
    /// Retried on every transient failure: repeating a drain only moves its deadline.
    pub async fn drain(&self, node_id: u64, deadline: Duration) -> Result<DrainResponse, Error> {
        let deadline_ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
        let (response, _) = self
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
        Ok(response)
    }

    /// Removes node `node_id` now (typically a dead node): a drain without a deadline, after
    /// which its id is refused for good. A dead node's jobs move once its lease expires.
    /// Retried on every transient failure: removing twice is harmless.
    pub async fn remove(&self, node_id: u64) -> Result<DrainResponse, Error> {
        let (response, _) = self
            .call(CallKind::Read, |channel, timeout| {
                let request = with_timeout(RemoveRequest { node_id }, timeout);
                async move { ClusterClient::new(channel).remove(request).await }
            })
            .await?;
        Ok(response)
    }

    /// Admits node `node_id`, reachable at `addr`, that was started without `--join`. Retried on
    /// every transient failure: admitting a member again changes nothing.
    pub async fn join(&self, node_id: u64, addr: String) -> Result<JoinResponse, Error> {
        let (response, _) = self
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
        Ok(response)
    }

    fn uri(&self, index: usize) -> String {
        self.inner.endpoints[index].uri.clone()
    }

    /// Runs one call with retries, returning the answer and the index of the endpoint that gave it.
    async fn call<T, F, Fut>(&self, kind: CallKind, mut attempt: F) -> Result<(T, usize), Error>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let inner = &*self.inner;
        let options = &inner.options;
        let call_timeout = Duration::from_millis(options.call_timeout_ms);
        // tonic enforces `call_timeout` once connected and `connect_timeout` while dialling; this
        // backstop only catches a try stuck somewhere neither covers.
        let backstop_ms = options.call_timeout_ms + options.connect_timeout_ms;
        let started = Instant::now();
        let count = inner.endpoints.len();
        let mut index = inner.preferred.load(Ordering::Relaxed) % count;
        let mut attempts: u32 = 0;
        loop {
            let node = &inner.endpoints[index];
            attempts += 1;
            let try_ = attempt(node.channel.clone(), call_timeout);
            let failure = match tokio::time::timeout(Duration::from_millis(backstop_ms), try_).await
            {
                Ok(Ok(response)) => {
                    inner.preferred.store(index, Ordering::Relaxed);
                    return Ok((response.into_inner(), index));
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
            let delay_ms = backoff_delay_ms(options, attempts - 1, rand::random::<f64>());
            let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            if !may_retry(options, attempts, elapsed_ms, delay_ms) {
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

/// Wraps a message in a request that carries the deadline to the server as `grpc-timeout`.
fn with_timeout<M>(message: M, timeout: Duration) -> tonic::Request<M> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// Adds `http://` to an endpoint given as a bare `host:port`.
pub(crate) fn normalize_endpoint(raw: &str) -> String {
    let trimmed = raw.trim();
    if trimmed.contains("://") {
        trimmed.to_string()
    } else {
        format!("http://{trimmed}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare host:port gets a scheme; a full URI is kept as given.
    #[test]
    fn endpoints_are_normalized() {
        assert_eq!(
            normalize_endpoint("127.0.0.1:7101"),
            "http://127.0.0.1:7101"
        );
        assert_eq!(normalize_endpoint(" https://a:1 "), "https://a:1");
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
}
