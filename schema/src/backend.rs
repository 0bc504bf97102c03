//! Which queue backend a process uses, and opening it.

use crate::{
    nats,
    queue::{ApalisQueue, Queue, QueueError},
};

/// Which queue backend a process uses.
#[derive(Debug, Clone, Default)]
pub enum QueueSettings {
    /// apalis-postgres, in Berth's own database.
    #[default]
    Postgres,
    /// NATS JetStream, fed through the outbox.
    Nats(nats::NatsSettings),
}

impl QueueSettings {
    pub fn name(&self) -> &'static str {
        match self {
            QueueSettings::Postgres => "postgres",
            QueueSettings::Nats(_) => "nats",
        }
    }

    /// The queue jobs are enqueued into, and the broker connection when there is
    /// one. With NATS the outbox relay runs until `shutdown` fires.
    pub async fn open(
        &self,
        pool: &sqlx::PgPool,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<(std::sync::Arc<dyn Queue>, Option<nats::Broker>), QueueError> {
        Ok(match self {
            QueueSettings::Postgres => (std::sync::Arc::new(ApalisQueue), None),
            QueueSettings::Nats(settings) => {
                let broker = nats::Broker::connect(settings.clone()).await?;
                // Whoever comes first creates the stream; until then the outbox holds jobs.
                let ensured = broker.clone();
                let stop = shutdown.clone();
                tokio::spawn(async move { ensured.ensure_all(&stop).await });
                let queue = nats::NatsQueue::start(pool.clone(), broker.clone(), shutdown);
                (std::sync::Arc::new(queue), Some(broker))
            }
        })
    }
}
