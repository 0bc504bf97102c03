//! The operator's queries and actions on Postgres.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    JobKind, JobRow, PgStore, StoreError,
    accounts::Page,
    console::{
        Console, JobCount, JobFilter, PROGRESS_CHANNEL, ProgressStep, ServerFilter, ServerListing,
        SpawnEvent, StateCount,
    },
    pg::release_admission,
};

/// Appends a progress event in the caller's transaction (or connection) and
/// announces it to every listener once that commits.
pub(crate) async fn insert_progress(
    conn: &mut PgConnection,
    job_id: Uuid,
    step: &ProgressStep,
) -> Result<(), StoreError> {
    sqlx::query(
        "with e as (insert into spawn_events (job_id, progress, message, ready, failed, url) \
         values ($1, $2, $3, $4, $5, $6) returning job_id) \
         select pg_notify($7, job_id::text) from e",
    )
    .bind(job_id)
    .bind(step.progress.clamp(0, 100))
    .bind(&step.message)
    .bind(step.ready)
    .bind(step.failed)
    .bind(&step.url)
    .bind(PROGRESS_CHANNEL)
    .execute(conn)
    .await?;
    Ok(())
}

#[async_trait]
impl Console for PgStore {
    async fn record_progress(&self, job_id: Uuid, step: &ProgressStep) -> Result<(), StoreError> {
        let mut conn = self.pool().acquire().await?;
        insert_progress(&mut conn, job_id, step).await
    }

    async fn relay_progress(
        &self,
        to: tokio::sync::broadcast::Sender<Uuid>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        while !shutdown.is_cancelled() {
            let relay = async {
                let mut listener = sqlx::postgres::PgListener::connect_with(self.pool()).await?;
                listener.listen(PROGRESS_CHANNEL).await?;
                loop {
                    let note = listener.recv().await?;
                    if let Ok(job) = note.payload().parse::<Uuid>() {
                        let _ = to.send(job);
                    }
                }
                #[allow(unreachable_code)]
                Ok::<(), sqlx::Error>(())
            };
            tokio::select! {
                result = relay => if let Err(e) = result {
                    tracing::warn!(error = %e, "progress notifications lost; streams poll until they resume");
                },
                _ = shutdown.cancelled() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn progress_after(
        &self,
        job_id: Uuid,
        after: i64,
    ) -> Result<Vec<SpawnEvent>, StoreError> {
        crate::reads::pg::progress_after(self.pool(), job_id, after).await
    }

    async fn jobs_page(
        &self,
        filter: &JobFilter,
        offset: i64,
        limit: i64,
    ) -> Result<Page<JobRow>, StoreError> {
        crate::reads::pg::jobs_page(self.pool(), filter, offset, limit).await
    }

    async fn job_ids(&self, filter: &JobFilter, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        crate::reads::pg::job_ids(self.pool(), filter, limit).await
    }

    async fn job_counts(&self) -> Result<Vec<JobCount>, StoreError> {
        crate::reads::pg::job_counts(self.pool()).await
    }

    async fn server_counts(&self) -> Result<Vec<StateCount>, StoreError> {
        crate::reads::pg::server_counts(self.pool()).await
    }

    async fn failures_since(&self, since: DateTime<Utc>) -> Result<i64, StoreError> {
        crate::reads::pg::failures_since(self.pool(), since).await
    }

    async fn cancel_job(&self, id: Uuid, by: &str) -> Result<JobRow, StoreError> {
        let mut tx = self.pool().begin().await?;
        let job = sqlx::query_as::<_, JobRow>("select * from jobs where id = $1 for update")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no job {id}")))?;
        crate::console::ensure_cancellable(&job)?;
        let reason = format!("cancelled by {by}");
        match job.kind() {
            Some(JobKind::Spawn) => {
                // The server was waiting on this spawn: it is stopped, its place given back.
                let servers: Vec<i64> = sqlx::query_scalar(
                    "update servers set state = 'stopped', stopped_at = now(), updated_at = now() \
                     where spawn_job_id = $1 and state = 'pending_spawn' returning id",
                )
                .bind(id)
                .fetch_all(&mut *tx)
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
                insert_progress(&mut tx, id, &step).await?;
            }
            Some(JobKind::Stop) => {
                // A stop of a running server is undone; one that interrupts a spawn is not
                // (the spawn has already seen it and is giving up).
                let server: Option<(i64, bool)> = sqlx::query_as(
                    "select id, container_id is not null and started_at is not null \
                     from servers where stop_job_id = $1 and state = 'pending_stop' for update",
                )
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
                match server {
                    Some((server, true)) => {
                        sqlx::query(
                            "update servers set state = 'running', stop_job_id = null, \
                             updated_at = now() where id = $1",
                        )
                        .bind(server)
                        .execute(&mut *tx)
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
            "update jobs set state = 'cancelled', last_error = $2, finished_at = now() \
             where id = $1 returning *",
        )
        .bind(id)
        .bind(&reason)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        crate::pg::count_end(&job);
        Ok(job)
    }

    async fn link_retry(&self, retry: Uuid, of: Uuid) -> Result<(), StoreError> {
        sqlx::query("update jobs set retry_of = $2 where id = $1")
            .bind(retry)
            .bind(of)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn repeat_job(&self, of: &JobRow) -> Result<JobRow, StoreError> {
        let kind = crate::console::repeatable_kind(of)?;
        let mut tx = self.pool().begin().await?;
        let job = self
            .insert_job(
                &mut tx,
                kind,
                &of.user_name,
                of.server_name.as_deref(),
                of.payload.clone(),
            )
            .await?;
        tx.commit().await?;
        self.queue().flush().await;
        Ok(job)
    }

    async fn servers_page(
        &self,
        filter: &ServerFilter,
        offset: i64,
        limit: i64,
    ) -> Result<Page<ServerListing>, StoreError> {
        let pattern = filter.user.as_deref().map(crate::pg_accounts::like_pattern);
        let items = sqlx::query_as::<_, ServerListing>(select_servers!(
            "where ($1::text is null or s.state = $1) and ($2::text is null or u.name like $2) \
             order by s.updated_at desc, s.id desc offset $3 limit $4"
        ))
        .bind(&filter.state)
        .bind(&pattern)
        .bind(offset)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        let total: i64 = sqlx::query_scalar(
            "select count(*) from servers s join users u on u.id = s.user_id \
             where ($1::text is null or s.state = $1) and ($2::text is null or u.name like $2)",
        )
        .bind(&filter.state)
        .bind(&pattern)
        .fetch_one(self.pool())
        .await?;
        Ok(Page { items, total })
    }
}
