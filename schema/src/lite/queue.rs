//! The queue of the embedded store: a `queue` table in the same file, written in
//! the transaction that records the request (so a 202 means the job is durable,
//! as on Postgres), taken by the workers of the same process.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

use super::SqliteStore;
use crate::db::now;
use crate::{jobs::JobEnvelope, jobs::JobKind, store::StoreError};

/// A job handed to a worker: which delivery this is, counted from 1.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    pub envelope: JobEnvelope,
    pub delivery: i32,
}

impl SqliteStore {
    /// Hands everything back at start-up: the process that had taken it is gone.
    pub async fn release_taken(&self) -> Result<u64, StoreError> {
        let mut tx = self.write().await?;
        let done = sqlx::query("update queue set taken_by = null where taken_by is not null")
            .execute(&mut *tx.tx)
            .await?;
        self.commit(tx, &[]).await?;
        Ok(done.rows_affected())
    }

    /// Takes up to `n` due jobs of `queue`, oldest first.
    pub async fn take(
        &self,
        queue: &str,
        n: usize,
        worker: &str,
    ) -> Result<Vec<Delivery>, StoreError> {
        let mut tx = self.write().await?;
        let rows: Vec<(Uuid, JobKind, i32)> = sqlx::query_as(
            "update queue set taken_by = $3, deliveries = deliveries + 1 where job_id in ( \
               select q.job_id from queue q where q.queue = $1 and q.taken_by is null \
               and q.run_at <= $4 order by q.run_at, q.job_id limit $2) \
             returning job_id, (select kind from jobs where id = queue.job_id), deliveries",
        )
        .bind(queue)
        .bind(n as i64)
        .bind(worker)
        .bind(now())
        .fetch_all(&mut *tx.tx)
        .await?;
        self.commit(tx, &[]).await?;
        let mut taken: Vec<Delivery> = rows
            .into_iter()
            .map(|(job_id, kind, delivery)| Delivery {
                envelope: JobEnvelope { job_id, kind },
                delivery,
            })
            .collect();
        // In the order they were enqueued (ids are time-ordered).
        taken.sort_by_key(|d| d.envelope.job_id);
        Ok(taken)
    }

    /// The job's handler is done with it: off the queue.
    pub async fn ack(&self, job_id: Uuid) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query("delete from queue where job_id = $1")
            .bind(job_id)
            .execute(&mut *tx.tx)
            .await?;
        self.commit(tx, &[]).await
    }

    /// Back on the queue, to be handed out again after `delay`.
    pub async fn hand_back(
        &self,
        job_id: Uuid,
        delay: Duration,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let run_at: DateTime<Utc> = now() + TimeDelta::from_std(delay).unwrap_or(TimeDelta::zero());
        let mut tx = self.write().await?;
        sqlx::query(
            "update queue set taken_by = null, run_at = $2, last_error = coalesce($3, last_error) \
             where job_id = $1",
        )
        .bind(job_id)
        .bind(run_at)
        .bind(error)
        .execute(&mut *tx.tx)
        .await?;
        self.commit(tx, &[]).await?;
        self.enqueued.notify_waiters();
        Ok(())
    }

    /// Resolves when a job may have been enqueued (or handed back) since the call.
    pub fn enqueued(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.enqueued.clone()
    }
}

/// The embedded queue as a [`crate::queue::Queue`]: a `queue` row written in the
/// caller's transaction; the consumer of this process is woken after the commit.
pub struct EmbeddedQueue {
    enqueued: std::sync::Arc<tokio::sync::Notify>,
}

impl EmbeddedQueue {
    pub(crate) fn new(enqueued: std::sync::Arc<tokio::sync::Notify>) -> Self {
        Self { enqueued }
    }
}

#[async_trait::async_trait]
impl crate::queue::Queue for EmbeddedQueue {
    async fn enqueue(
        &self,
        tx: crate::db::Conn<'_>,
        job: &JobEnvelope,
        at: DateTime<Utc>,
    ) -> Result<(), crate::queue::QueueError> {
        let crate::db::Dialect::Lite(tx) = tx else {
            return Err(crate::queue::QueueError::Backend(
                "the embedded queue lives in SQLite".into(),
            ));
        };
        sqlx::query("insert into queue (job_id, queue, run_at) values ($1, $2, $3)")
            .bind(job.job_id)
            .bind(job.kind.queue())
            .bind(at)
            .execute(tx)
            .await
            .map_err(|e| crate::queue::QueueError::Backend(e.to_string()))?;
        Ok(())
    }

    async fn flush(&self) {
        self.enqueued.notify_waiters();
    }

    async fn withdraw(
        &self,
        tx: crate::db::Conn<'_>,
        job_id: Uuid,
    ) -> Result<(), crate::queue::QueueError> {
        if let crate::db::Dialect::Lite(tx) = tx {
            sqlx::query("delete from queue where job_id = $1")
                .bind(job_id)
                .execute(tx)
                .await
                .map_err(|e| crate::queue::QueueError::Backend(e.to_string()))?;
        }
        Ok(())
    }
}
