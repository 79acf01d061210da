//! Everything that talks to NATS besides the publish loops: connections, the stream and durable
//! consumer the bench recreates before measuring, and the worker that ends each job with a
//! confirmed ack (`double_ack`: the server answers once it has recorded the ack).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::context::{DeleteStreamErrorKind, PublishError};
use async_nats::jetstream::{self, stream, Context, ErrorCode};
use futures::StreamExt;
use tokio::time::Instant;

use crate::report::{classify, Answer};

/// The stream every run recreates.
pub const STREAM: &str = "BENCH";
/// The one subject of [`STREAM`].
pub const SUBJECT: &str = "bench.jobs";
/// The durable pull consumer on [`STREAM`].
pub const CONSUMER: &str = "BENCH_WORKER";
/// Replicas of the stream (and of its consumer, which inherits them): one per server.
pub const STREAM_REPLICAS: usize = 3;
/// Longest wait for the cluster to accept the stream and consumer, in milliseconds; a fresh
/// cluster refuses both until it has elected its JetStream meta leader.
pub const SETUP_TIMEOUT_MS: u64 = 30_000;
/// Pause between setup attempts, in milliseconds.
const SETUP_RETRY_INTERVAL_MS: u64 = 250;
/// Messages one pull request asks for.
pub const PULL_BATCH_MAX: usize = 1_000;
/// Idle heartbeat of the pull requests, in milliseconds.
const PULL_HEARTBEAT_MS: u64 = 5_000;
/// Confirmed acks the worker awaits at once.
pub const ACKS_IN_FLIGHT_MAX: usize = 4_096;
/// Deliveries the consumer leaves unacknowledged at most (the server's default is lower).
pub const CONSUMER_ACK_PENDING_MAX: i64 = 50_000;
/// How often a wait for finished messages looks again, in milliseconds.
const FINISHED_POLL_INTERVAL_MS: u64 = 20;

// Every ack in flight plus a whole pull batch must fit under the consumer's pending limit, or the
// server stops delivering while the worker still has room.
const _: () = assert!((ACKS_IN_FLIGHT_MAX + PULL_BATCH_MAX) as i64 <= CONSUMER_ACK_PENDING_MAX);

/// A JetStream context on its own connection. `rotate` picks the server tried first, so the
/// connections spread over the cluster; `ack_timeout` bounds every publish ack, confirmed ack and
/// API request; `acks_in_flight_max` is how many publishes may await their ack at once.
pub async fn connect(
    servers: &[String],
    rotate: usize,
    ack_timeout: Duration,
    acks_in_flight_max: usize,
) -> anyhow::Result<Context> {
    let mut rotated = servers.to_vec();
    rotated.rotate_left(rotate % servers.len().max(1));
    let client = async_nats::ConnectOptions::new()
        .name("exactly-peer-bench")
        .retain_servers_order()
        .connect(rotated.as_slice())
        .await
        .with_context(|| format!("connecting to NATS at {}", rotated.join(",")))?;
    Ok(jetstream::ContextBuilder::new()
        .timeout(ack_timeout)
        .max_ack_inflight(acks_in_flight_max)
        .build(client))
}

/// Deletes [`STREAM`] if it exists and creates it again, empty, with its durable pull consumer;
/// retries for [`SETUP_TIMEOUT_MS`] while the cluster is not ready.
pub async fn recreate(js: &Context, ack_wait: Duration) -> anyhow::Result<PullConsumer> {
    let deadline = Instant::now() + Duration::from_millis(SETUP_TIMEOUT_MS);
    loop {
        match try_recreate(js, ack_wait).await {
            Ok(consumer) => return Ok(consumer),
            Err(err) if Instant::now() < deadline => {
                note_setup_retry(&err);
                tokio::time::sleep(Duration::from_millis(SETUP_RETRY_INTERVAL_MS)).await;
            }
            Err(err) => {
                return Err(err.context(format!(
                    "JetStream did not accept stream {STREAM} and consumer {CONSUMER} within \
                     {SETUP_TIMEOUT_MS} ms"
                )))
            }
        }
    }
}

/// Setup retries are normal on a fresh cluster; they are printed only when
/// `EXACTLY_PEER_BENCH_VERBOSE` is set.
fn note_setup_retry(err: &anyhow::Error) {
    if std::env::var_os("EXACTLY_PEER_BENCH_VERBOSE").is_some() {
        eprintln!("setup not ready yet: {err:#}");
    }
}

async fn try_recreate(js: &Context, ack_wait: Duration) -> anyhow::Result<PullConsumer> {
    match js.delete_stream(STREAM).await {
        Ok(_) => {}
        Err(err)
            if matches!(
                err.kind(),
                DeleteStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND
            ) => {}
        Err(err) => {
            return Err(anyhow::Error::new(err).context(format!("deleting stream {STREAM}")))
        }
    }
    let stream = js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec![SUBJECT.into()],
            // A work queue drops each message once acked: the job is done and gone, which is
            // what a job queue on JetStream looks like.
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: STREAM_REPLICAS,
            ..stream::Config::default()
        })
        .await
        .with_context(|| format!("creating stream {STREAM}"))?;
    stream
        .create_consumer(pull::Config {
            durable_name: Some(CONSUMER.into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait,
            max_ack_pending: CONSUMER_ACK_PENDING_MAX,
            ..pull::Config::default()
        })
        .await
        .with_context(|| format!("creating consumer {CONSUMER}"))
}

/// The answer to one publish: its PubAck's stream sequence or the classified failure, with the
/// client's error text.
pub fn answer_of(
    result: Result<jetstream::publish::PublishAck, PublishError>,
) -> (Answer, Option<String>) {
    match result {
        Ok(ack) => (Answer::Acknowledged(ack.sequence), None),
        Err(err) => {
            let server_error = std::error::Error::source(&err)
                .is_some_and(|source| source.downcast_ref::<jetstream::Error>().is_some());
            (classify(err.kind(), server_error), Some(err.to_string()))
        }
    }
}

/// Failures seen by the worker.
#[derive(Debug, Default)]
struct AckErrors {
    count: u64,
    first: Option<String>,
}

/// The consumer side: pulls messages and ends each with a confirmed ack, remembering when each
/// stream sequence's ack was confirmed. Stops when dropped.
pub struct Worker {
    finished: Arc<Mutex<HashMap<u64, Instant>>>,
    errors: Arc<Mutex<AckErrors>>,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    /// Starts pulling from `consumer` on its own connection.
    pub async fn start(consumer: &PullConsumer) -> anyhow::Result<Worker> {
        let messages = consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH_MAX)
            .heartbeat(Duration::from_millis(PULL_HEARTBEAT_MS))
            .messages()
            .await
            .with_context(|| format!("starting to pull from consumer {CONSUMER}"))?;
        let finished: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
        let errors: Arc<Mutex<AckErrors>> = Arc::default();
        let task = {
            let finished = finished.clone();
            let errors = errors.clone();
            tokio::spawn(
                messages.for_each_concurrent(ACKS_IN_FLIGHT_MAX, move |item| {
                    let finished = finished.clone();
                    let errors = errors.clone();
                    async move {
                        let failure = match item {
                            Ok(message) => match message.info().map(|i| i.stream_sequence) {
                                Ok(sequence) => match message.double_ack().await {
                                    Ok(()) => {
                                        lock(&finished)
                                            .entry(sequence)
                                            .or_insert_with(Instant::now);
                                        None
                                    }
                                    Err(err) => Some(format!("confirmed ack: {err}")),
                                },
                                Err(err) => Some(format!("reading the message's sequence: {err}")),
                            },
                            Err(err) => Some(format!("pulling: {err}")),
                        };
                        if let Some(failure) = failure {
                            let mut errors = lock(&errors);
                            errors.count += 1;
                            errors.first.get_or_insert(failure);
                        }
                    }
                }),
            )
        };
        Ok(Worker {
            finished,
            errors,
            task,
        })
    }

    /// Waits until every sequence in `sequences` has a confirmed ack or `until` passes; true if
    /// all have.
    pub async fn wait_for(&self, sequences: &[u64], until: Instant) -> bool {
        // Sequences confirmed stay confirmed, so each check resumes where the last one stopped.
        let mut done = 0;
        loop {
            {
                let finished = lock(&self.finished);
                while done < sequences.len() && finished.contains_key(&sequences[done]) {
                    done += 1;
                }
            }
            if done == sequences.len() {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(FINISHED_POLL_INTERVAL_MS)).await;
        }
    }

    /// How many messages have had their ack confirmed so far.
    pub fn finished_count(&self) -> usize {
        lock(&self.finished).len()
    }

    /// When each stream sequence's ack was confirmed, so far.
    pub fn finished(&self) -> HashMap<u64, Instant> {
        lock(&self.finished).clone()
    }

    /// Failed confirmed acks and pulls so far, and the first one's text.
    pub fn errors(&self) -> (u64, Option<String>) {
        let errors = lock(&self.errors);
        (errors.count, errors.first.clone())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Locks a mutex; a panicked holder cannot leave these maps half-written, so poison is ignored.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
