//! The Postgres store.

use std::sync::Arc;

use sqlx::PgPool;

use tokio_util::sync::CancellationToken;

use crate::{
    QueueSettings,
    nats::Broker,
    pg_locks::{SERVER_LOCK_SPACE, SessionLock, lock_key},
    pg_notify::Notifier,
    queue::{Queue, QueueError},
    store::{ServerLock, StoreError},
};

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    queue: Arc<dyn Queue>,
    /// The JetStream connection when jobs travel through NATS.
    broker: Option<Broker>,
    /// Sends notifications after commits (`pg_notify`).
    notifier: Notifier,
}

impl PgStore {
    /// The store over `pool` with a queue of the caller's making (no broker).
    pub fn new(pool: PgPool, queue: Arc<dyn Queue>) -> Self {
        Self {
            notifier: Notifier::start(pool.clone()),
            pool,
            queue,
            broker: None,
        }
    }

    /// The store over `pool` with the configured queue backend. With NATS the
    /// outbox relay runs until `stop` fires: cancel it once every role has ended,
    /// so jobs enqueued during a shutdown's grace period still reach the broker.
    pub async fn open(
        pool: PgPool,
        queue: &QueueSettings,
        stop: CancellationToken,
    ) -> Result<Self, QueueError> {
        let (queue, broker) = queue.open(&pool, stop).await?;
        Ok(Self {
            notifier: Notifier::start(pool.clone()),
            pool,
            queue,
            broker,
        })
    }

    /// The JetStream broker, when jobs travel through NATS.
    pub fn broker(&self) -> Option<&Broker> {
        self.broker.as_ref()
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(crate) fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    pub(crate) fn queue_handle(&self) -> Arc<dyn Queue> {
        self.queue.clone()
    }

    pub(crate) async fn lock_server(
        &self,
        server_id: i64,
    ) -> Result<Box<dyn ServerLock>, StoreError> {
        SessionLock::take(&self.pool, SERVER_LOCK_SPACE, lock_key(server_id)).await
    }
}
