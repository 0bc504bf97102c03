//! `Console` on SQLite.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{SqliteStore, now, store::release_admission};
use crate::{
    JobKind, JobRow, StoreError,
    accounts::Page,
    console::{
        Console, JobCount, JobFilter, ProgressStep, ServerFilter, ServerListing, SpawnEvent,
        StateCount,
    },
    pg::count_end,
    pg_accounts::like_pattern,
};

#[async_trait]
impl Console for SqliteStore {
    async fn record_progress(&self, job_id: Uuid, step: &ProgressStep) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        Self::insert_progress(&mut tx, job_id, step).await?;
        self.commit(tx).await
    }

    async fn relay_progress(
        &self,
        to: tokio::sync::broadcast::Sender<Uuid>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut heard = self.progress.subscribe();
        loop {
            tokio::select! {
                job = heard.recv() => match job {
                    Ok(job) => { let _ = to.send(job); }
                    // Missed some: the streams poll every second anyway.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn progress_after(
        &self,
        job_id: Uuid,
        after: i64,
    ) -> Result<Vec<SpawnEvent>, StoreError> {
        crate::reads::lite::progress_after(self.pool(), job_id, after).await
    }

    async fn jobs_page(
        &self,
        filter: &JobFilter,
        offset: i64,
        limit: i64,
    ) -> Result<Page<JobRow>, StoreError> {
        crate::reads::lite::jobs_page(self.pool(), filter, offset, limit).await
    }

    async fn job_ids(&self, filter: &JobFilter, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        crate::reads::lite::job_ids(self.pool(), filter, limit).await
    }

    async fn job_counts(&self) -> Result<Vec<JobCount>, StoreError> {
        crate::reads::lite::job_counts(self.pool()).await
    }

    async fn server_counts(&self) -> Result<Vec<StateCount>, StoreError> {
        crate::reads::lite::server_counts(self.pool()).await
    }

    async fn failures_since(&self, since: DateTime<Utc>) -> Result<i64, StoreError> {
        crate::reads::lite::failures_since(self.pool(), since).await
    }

    async fn cancel_job(&self, id: Uuid, by: &str) -> Result<JobRow, StoreError> {
        let at = now();
        let mut tx = self.write().await?;
        let job = sqlx::query_as::<_, JobRow>("select * from jobs where id = $1")
            .bind(id)
            .fetch_optional(&mut *tx.tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no job {id}")))?;
        crate::console::ensure_cancellable(&job)?;
        let reason = format!("cancelled by {by}");
        match job.kind() {
            Some(JobKind::Spawn) => {
                let servers: Vec<i64> = sqlx::query_scalar(
                    "update servers set state = 'stopped', stopped_at = $2, updated_at = $2 \
                     where spawn_job_id = $1 and state = 'pending_spawn' returning id",
                )
                .bind(id)
                .bind(at)
                .fetch_all(&mut *tx.tx)
                .await?;
                for server in servers {
                    release_admission(&mut tx, server).await?;
                }
                let step = ProgressStep {
                    progress: 100,
                    message: format!("the spawn was {reason}"),
                    failed: true,
                    ..Default::default()
                };
                Self::insert_progress(&mut tx, id, &step).await?;
            }
            Some(JobKind::Stop) => {
                let server: Option<(i64, bool)> = sqlx::query_as(
                    "select id, container_id is not null and started_at is not null \
                     from servers where stop_job_id = $1 and state = 'pending_stop'",
                )
                .bind(id)
                .fetch_optional(&mut *tx.tx)
                .await?;
                match server {
                    Some((server, true)) => {
                        sqlx::query(
                            "update servers set state = 'running', stop_job_id = null, \
                             updated_at = $2 where id = $1",
                        )
                        .bind(server)
                        .bind(at)
                        .execute(&mut *tx.tx)
                        .await?;
                    }
                    Some((_, false)) => {
                        return Err(StoreError::Conflict(
                            "this stop interrupts a spawn and cannot be cancelled".into(),
                        ));
                    }
                    None => {}
                }
            }
            _ => {}
        }
        let job = sqlx::query_as::<_, JobRow>(
            "update jobs set state = 'cancelled', last_error = $2, finished_at = $3 \
             where id = $1 returning *",
        )
        .bind(id)
        .bind(&reason)
        .bind(at)
        .fetch_one(&mut *tx.tx)
        .await?;
        // Off the queue: nothing is left for a worker to do.
        sqlx::query("delete from queue where job_id = $1")
            .bind(id)
            .execute(&mut *tx.tx)
            .await?;
        self.commit(tx).await?;
        count_end(&job);
        Ok(job)
    }

    async fn link_retry(&self, retry: Uuid, of: Uuid) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query("update jobs set retry_of = $2 where id = $1")
            .bind(retry)
            .bind(of)
            .execute(&mut *tx.tx)
            .await?;
        self.commit(tx).await
    }

    async fn repeat_job(&self, of: &JobRow) -> Result<JobRow, StoreError> {
        let kind = crate::console::repeatable_kind(of)?;
        let mut tx = self.write().await?;
        let job = self
            .insert_job(
                &mut tx,
                kind,
                &of.user_name,
                of.server_name.as_deref(),
                of.payload.clone(),
            )
            .await?;
        self.commit(tx).await?;
        Ok(job)
    }

    async fn servers_page(
        &self,
        filter: &ServerFilter,
        offset: i64,
        limit: i64,
    ) -> Result<Page<ServerListing>, StoreError> {
        let pattern = filter.user.as_deref().map(like_pattern);
        let items = sqlx::query_as::<_, ServerListing>(select_servers!(
            "where ($1 is null or s.state = $1) and ($2 is null or u.name like $2 escape '\\') \
             order by s.updated_at desc, s.id desc limit $4 offset $3"
        ))
        .bind(&filter.state)
        .bind(&pattern)
        .bind(offset)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        let total: i64 = sqlx::query_scalar(
            "select count(*) from servers s join users u on u.id = s.user_id \
             where ($1 is null or s.state = $1) and ($2 is null or u.name like $2 escape '\\')",
        )
        .bind(&filter.state)
        .bind(&pattern)
        .fetch_one(self.pool())
        .await?;
        Ok(Page { items, total })
    }
}
