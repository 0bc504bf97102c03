//! The queue interface. The API enqueues inside the same database transaction
//! that records the request, so a 202 always means the job is durable.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::{
    db::{Conn, Dialect},
    jobs::JobEnvelope,
};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("could not encode job: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("queue backend: {0}")]
    Backend(String),
}

/// Where jobs go. Implementations write through the caller's transaction: either
/// straight into the broker's tables (Postgres) or into an outbox that a relay
/// publishes from (brokers outside the database).
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Records `job` through the caller's transaction; `at` is the job's creation time.
    async fn enqueue(
        &self,
        tx: Conn<'_>,
        job: &JobEnvelope,
        at: DateTime<Utc>,
    ) -> Result<(), QueueError>;

    /// Called once the transaction that enqueued has committed: a backend outside
    /// the database hands the jobs to its broker here. Never fails: the jobs are
    /// durable already, and a relay retries what this could not do.
    async fn flush(&self) {}

    /// A job cancelled before it ran: a backend that can take it back does (the
    /// others deliver it, and its handler finds it ended).
    async fn withdraw(&self, _tx: Conn<'_>, _job_id: uuid::Uuid) -> Result<(), QueueError> {
        Ok(())
    }
}

/// How often the backend hands a job out when its handler errs before giving up.
pub const MAX_DELIVERIES: usize = 25;

/// apalis-postgres as the queue: tasks go into `apalis.jobs` in the caller's
/// transaction, keyed by the job id so a retried enqueue cannot double a job.
#[derive(Debug, Default, Clone)]
pub struct ApalisQueue;

#[async_trait]
impl Queue for ApalisQueue {
    async fn enqueue(
        &self,
        tx: Conn<'_>,
        job: &JobEnvelope,
        _at: DateTime<Utc>,
    ) -> Result<(), QueueError> {
        let Dialect::Pg(tx) = tx else {
            return Err(QueueError::Backend("apalis-postgres needs Postgres".into()));
        };
        let bytes = serde_json::to_vec(job)?;
        let task = apalis::prelude::TaskBuilder::new(bytes)
            .idempotency_key(job.job_id.to_string())
            .max_attempts(MAX_DELIVERIES)
            .build();
        apalis_postgres::queries::push_tasks(tx, job.kind.queue(), vec![task])
            .await
            .map_err(|e| QueueError::Backend(e.to_string()))
    }
}

/// Creates apalis-postgres's own tables (schema `apalis`) when missing.
pub async fn setup_apalis(pool: &sqlx::PgPool) -> Result<(), QueueError> {
    apalis_postgres::PostgresStorage::setup(pool)
        .await
        .map_err(|e| QueueError::Backend(e.to_string()))
}

/// Hands back to the queue the tasks that apalis consumer `worker` had taken.
/// For a consumer that is known to be gone (its future was dropped when it
/// failed): apalis itself hands a consumer's tasks back only once its heartbeats
/// stop, and a consumer rebuilt under the same id would keep them alive forever.
pub async fn hand_back_apalis_tasks(pool: &sqlx::PgPool, worker: &str) -> Result<u64, QueueError> {
    sqlx::query(
        "update apalis.jobs set status = 'Pending', lock_by = null, lock_at = null, \
           last_result = '{\"Err\": \"handed back: its consumer failed\"}' \
         where lock_by = $1 and status in ('Queued', 'Running')",
    )
    .bind(worker)
    .execute(pool)
    .await
    .map(|r| r.rows_affected())
    .map_err(|e| QueueError::Backend(e.to_string()))
}
