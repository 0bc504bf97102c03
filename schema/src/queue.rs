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

    /// Records several jobs through the caller's transaction (a batch of
    /// requests); one by one unless the backend can do better.
    async fn enqueue_many(
        &self,
        mut tx: Conn<'_>,
        jobs: &[JobEnvelope],
        at: DateTime<Utc>,
    ) -> Result<(), QueueError> {
        for job in jobs {
            let conn = match &mut tx {
                Dialect::Pg(c) => Dialect::Pg(&mut **c),
                Dialect::Lite(c) => Dialect::Lite(&mut **c),
            };
            self.enqueue(conn, job, at).await?;
        }
        Ok(())
    }

    /// A notification to send once the enqueuing transaction has committed, for
    /// a backend whose consumers listen for new jobs (never inside the
    /// transaction: see `Tx::commit`).
    fn notice(&self, _job: &JobEnvelope) -> Option<(&'static str, String)> {
        None
    }

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
        at: DateTime<Utc>,
    ) -> Result<(), QueueError> {
        self.enqueue_many(tx, std::slice::from_ref(job), at).await
    }

    /// One statement for all of them (apalis-postgres inserts from arrays); the
    /// jobs of one call share a queue.
    async fn enqueue_many(
        &self,
        tx: Conn<'_>,
        jobs: &[JobEnvelope],
        _at: DateTime<Utc>,
    ) -> Result<(), QueueError> {
        let Dialect::Pg(tx) = tx else {
            return Err(QueueError::Backend("apalis-postgres needs Postgres".into()));
        };
        let Some(first) = jobs.first() else {
            return Ok(());
        };
        debug_assert!(jobs.iter().all(|j| j.kind.queue() == first.kind.queue()));
        let tasks = jobs
            .iter()
            .map(|job| {
                Ok(apalis::prelude::TaskBuilder::new(serde_json::to_vec(job)?)
                    .idempotency_key(job.job_id.to_string())
                    .max_attempts(MAX_DELIVERIES)
                    .build())
            })
            .collect::<Result<Vec<_>, QueueError>>()?;
        apalis_postgres::queries::push_tasks(tx, first.kind.queue(), tasks)
            .await
            .map_err(|e| QueueError::Backend(e.to_string()))
    }

    /// What apalis-postgres's trigger sent inside the transaction (dropped by
    /// `setup_apalis`): its consumers wake on any event of their queue, the id
    /// only has to read as a task id (the job's own, as a ULID).
    fn notice(&self, job: &JobEnvelope) -> Option<(&'static str, String)> {
        let id = ulid::Ulid::from(job.job_id.as_u128()).to_string();
        let event = serde_json::json!({ "job_type": job.kind.queue(), "id": id });
        Some((APALIS_INSERT_CHANNEL, event.to_string()))
    }
}

/// Where apalis-postgres's consumers hear of new tasks.
pub const APALIS_INSERT_CHANNEL: &str = "apalis::job::insert";

/// Creates apalis-postgres's own tables (schema `apalis`) when missing.
/// Its trigger that notifies consumers inside every enqueuing transaction is
/// dropped: Berth notifies after the commit (`Queue::notice`), since a NOTIFY
/// inside a transaction makes commits wait for one another.
pub async fn setup_apalis(pool: &sqlx::PgPool) -> Result<(), QueueError> {
    apalis_postgres::PostgresStorage::setup(pool)
        .await
        .map_err(|e| QueueError::Backend(e.to_string()))?;
    sqlx::query("drop trigger if exists notify_workers on apalis.jobs")
        .execute(pool)
        .await
        .map_err(|e| QueueError::Backend(e.to_string()))?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::JobKind;

    /// apalis-postgres's consumers read the notification Berth sends after the
    /// commit as they read the one its trigger sent: for the job's queue.
    #[test]
    fn the_new_task_notice_reads_as_apalis_postgres_own() {
        let job = JobEnvelope {
            job_id: uuid::Uuid::now_v7(),
            kind: JobKind::Spawn,
        };
        let (channel, payload) = ApalisQueue.notice(&job).expect("a notice");
        assert_eq!(channel, "apalis::job::insert");
        let event: apalis_postgres::InsertEvent =
            serde_json::from_str(&payload).expect("apalis-postgres reads it");
        assert_eq!(event.job_type, crate::jobs::SPAWN_QUEUE);
        assert_eq!(
            event.id.to_string(),
            ulid::Ulid::from(job.job_id.as_u128()).to_string()
        );
    }
}
