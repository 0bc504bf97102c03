//! NATS JetStream as the queue backend: the stream and its consumers, and the
//! outbox that carries jobs from a Postgres transaction to the broker.
//!
//! A job is recorded with an `outbox` row in the request's own transaction. After
//! the commit the recording process publishes the row at once and waits for the
//! broker's acknowledgement before it answers; a relay in every API and worker
//! process publishes whatever is left (the broker was down, the process died
//! between commit and publish). Each row is published with the message id
//! `{job}:{row}`, which JetStream de-duplicates within its duplicate window, and the
//! row is deleted once acknowledged; a message that still arrives twice finds its
//! job ended and is a no-op. So a recorded job runs exactly once.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::{self, consumer::PullConsumer, stream::Stream};
use async_trait::async_trait;
use sqlx::PgPool;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    jobs::{CONTROL_QUEUE, JobEnvelope, SPAWN_QUEUE},
    queue::{MAX_DELIVERIES, Queue, QueueError},
};

/// How a deployment uses JetStream. Streams and consumers are created with these
/// settings when missing; existing ones are used as they are.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// `nats://host:port`, comma-separated for several servers.
    pub url: String,
    /// Stream name; subjects are `{stream}.spawn` and `{stream}.control`.
    pub stream: String,
    /// How long a delivered job may go without a sign of life (workers send one
    /// every third of it while a job runs) before the broker hands it out again.
    pub ack_wait: Duration,
    /// Deliveries of one job before it is dead-lettered (marked failed).
    pub max_deliver: i64,
    /// Window in which the broker drops a second publish of one outbox row.
    pub duplicate_window: Duration,
    /// Stream replicas (1 for a single server; 3 for a cluster).
    pub replicas: usize,
    /// How long a request waits for the broker's acknowledgement before it answers
    /// anyway; the job is already durable in the outbox and the relay retries.
    pub publish_timeout: Duration,
}

impl NatsSettings {
    pub fn new(url: impl Into<String>, stream: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            stream: stream.into(),
            ack_wait: Duration::from_secs(30),
            max_deliver: MAX_DELIVERIES as i64,
            duplicate_window: Duration::from_secs(600),
            replicas: 1,
            publish_timeout: Duration::from_secs(2),
        }
    }

    /// The subject of one of Berth's queues (`berth.spawn` → `{stream}.spawn`).
    pub fn subject(&self, queue: &str) -> String {
        format!("{}.{}", self.stream, short_name(queue))
    }

    /// The durable consumer that workers share for one queue.
    pub fn consumer(&self, queue: &str) -> String {
        format!("{}-{}", self.stream, short_name(queue))
    }

    /// Where the broker announces a job that used up its deliveries.
    pub fn max_deliveries_advisory(&self, queue: &str) -> String {
        format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
            self.stream,
            self.consumer(queue)
        )
    }
}

fn short_name(queue: &str) -> &str {
    queue.rsplit('.').next().unwrap_or(queue)
}

/// A connection to the broker.
#[derive(Clone)]
pub struct Broker {
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub settings: NatsSettings,
}

fn backend(e: impl std::fmt::Display) -> QueueError {
    QueueError::Backend(e.to_string())
}

impl Broker {
    /// Connects; when the broker is not up yet the client keeps trying in the
    /// background, so an API can record jobs (into the outbox) meanwhile.
    pub async fn connect(settings: NatsSettings) -> Result<Self, QueueError> {
        let client = async_nats::ConnectOptions::new()
            .name("berth")
            .retry_on_initial_connect()
            .connect(settings.url.as_str())
            .await
            .map_err(backend)?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(settings.publish_timeout)
            .build(client.clone());
        Ok(Self {
            client,
            jetstream,
            settings,
        })
    }

    /// The work-queue stream holding both queues, created when missing: file
    /// storage, a message removed once acknowledged, duplicates dropped.
    pub async fn ensure_stream(&self) -> Result<Stream, QueueError> {
        let s = &self.settings;
        self.jetstream
            .get_or_create_stream(jetstream::stream::Config {
                name: s.stream.clone(),
                subjects: vec![format!("{}.*", s.stream)],
                retention: jetstream::stream::RetentionPolicy::WorkQueue,
                storage: jetstream::stream::StorageType::File,
                num_replicas: s.replicas.max(1),
                duplicate_window: s.duplicate_window,
                description: Some("Berth jobs: spawn, stop and cleanup".into()),
                ..Default::default()
            })
            .await
            .map_err(backend)
    }

    /// The durable pull consumer of one queue, created when missing: explicit
    /// acknowledgements, `ack_wait`, at most `max_deliver` deliveries.
    pub async fn ensure_consumer(&self, queue: &str) -> Result<PullConsumer, QueueError> {
        let s = &self.settings;
        let name = s.consumer(queue);
        self.ensure_stream()
            .await?
            .get_or_create_consumer(
                &name,
                jetstream::consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: s.subject(queue),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: s.ack_wait,
                    max_deliver: s.max_deliver,
                    max_ack_pending: 10_000,
                    description: Some(format!("Berth workers taking {queue} jobs")),
                    ..Default::default()
                },
            )
            .await
            .map_err(backend)
    }

    /// Creates the stream and both consumers, retrying until the broker answers or
    /// `shutdown` fires.
    pub async fn ensure_all(&self, shutdown: &CancellationToken) -> Result<(), QueueError> {
        loop {
            let made = async {
                self.ensure_consumer(SPAWN_QUEUE).await?;
                self.ensure_consumer(CONTROL_QUEUE).await
            };
            match made.await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, url = %self.settings.url, "JetStream is not available yet; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => return Err(e),
                    }
                }
            }
        }
    }
}

/// The NATS queue: `enqueue` writes an outbox row in the caller's transaction;
/// `flush` publishes it once committed. Cloning shares the relay.
#[derive(Clone)]
pub struct NatsQueue {
    relay: Arc<Relay>,
}

struct Relay {
    pool: PgPool,
    broker: Broker,
    /// Passes begun, and (watched) passes finished.
    started: AtomicU64,
    finished: watch::Sender<u64>,
    kick: Notify,
}

/// Rows one relay pass publishes at most.
const PASS_ROWS: i64 = 500;
/// How often the relay looks for rows nobody published.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl NatsQueue {
    /// Starts the relay; it runs until `shutdown` fires.
    pub fn start(pool: PgPool, broker: Broker, shutdown: CancellationToken) -> Self {
        let relay = Arc::new(Relay {
            pool,
            broker,
            started: AtomicU64::new(0),
            finished: watch::channel(0).0,
            kick: Notify::new(),
        });
        tokio::spawn(relay.clone().run(shutdown));
        Self { relay }
    }

    pub fn broker(&self) -> &Broker {
        &self.relay.broker
    }
}

#[async_trait]
impl Queue for NatsQueue {
    async fn enqueue(
        &self,
        tx: crate::db::Conn<'_>,
        job: &JobEnvelope,
        _at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), QueueError> {
        let crate::db::Dialect::Pg(tx) = tx else {
            return Err(QueueError::Backend(
                "the NATS outbox lives in Postgres".into(),
            ));
        };
        sqlx::query("insert into outbox (job_id, queue, payload) values ($1, $2, $3)")
            .bind(job.job_id)
            .bind(job.kind.queue())
            .bind(serde_json::to_value(job)?)
            .execute(tx)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn flush(&self) {
        let relay = &self.relay;
        // The next pass to begin starts after this call, so it sees the rows the
        // caller has committed.
        let target = relay.started.load(Ordering::SeqCst) + 1;
        relay.kick.notify_one();
        let mut finished = relay.finished.subscribe();
        let wait = finished.wait_for(|done| *done >= target);
        if tokio::time::timeout(relay.broker.settings.publish_timeout * 2, wait)
            .await
            .is_err()
        {
            tracing::warn!("the broker has not acknowledged yet; the outbox relay keeps trying");
        }
    }
}

#[derive(sqlx::FromRow)]
struct OutboxRow {
    id: i64,
    job_id: Uuid,
    queue: String,
    payload: serde_json::Value,
}

impl Relay {
    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            let swept = tokio::select! {
                _ = self.kick.notified() => false,
                _ = tokio::time::sleep(SWEEP_EVERY) => true,
                _ = shutdown.cancelled() => return,
            };
            self.started.fetch_add(1, Ordering::SeqCst);
            // A sweep leaves young rows to the process that wrote them.
            let min_age = if swept { 1.0 } else { 0.0 };
            let result = self.pass(min_age).await;
            self.finished.send_modify(|n| *n += 1);
            match result {
                Ok(published) => {
                    if failing || (swept && published > 0) {
                        tracing::info!(published, "outbox relay published jobs");
                    }
                    failing = false;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "outbox relay could not publish; retrying");
                    }
                    failing = true;
                }
            }
        }
    }

    /// Publishes up to `PASS_ROWS` unpublished rows at least `min_age` seconds old,
    /// all in flight at once, and deletes those the broker acknowledged.
    async fn pass(&self, min_age: f64) -> Result<usize, QueueError> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "select id, job_id, queue, payload from outbox \
             where created_at <= now() - make_interval(secs => $1) \
             order by id limit $2 for update skip locked",
        )
        .bind(min_age)
        .bind(PASS_ROWS)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend)?;
        if rows.is_empty() {
            return Ok(0);
        }
        let settings = &self.broker.settings;
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            let message = jetstream::message::PublishMessage::build()
                .payload(serde_json::to_vec(&row.payload)?.into())
                .message_id(format!("{}:{}", row.job_id, row.id));
            let sent = self
                .broker
                .jetstream
                .send_publish(settings.subject(&row.queue), message)
                .await;
            pending.push((row.id, sent));
        }
        let mut acked = Vec::new();
        let mut failed = Vec::new();
        for (id, sent) in pending {
            let result = match sent {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(()) => acked.push(id),
                Err(e) => failed.push((id, e)),
            }
        }
        sqlx::query("delete from outbox where id = any($1)")
            .bind(&acked)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        if let Some((_, error)) = failed.first() {
            let ids: Vec<i64> = failed.iter().map(|(id, _)| *id).collect();
            sqlx::query(
                "update outbox set attempts = attempts + 1, last_error = $2 where id = any($1)",
            )
            .bind(&ids)
            .bind(error)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        match failed.into_iter().next() {
            None => Ok(acked.len()),
            Some((_, e)) => Err(QueueError::Backend(e)),
        }
    }
}
