//! The operator's side of the store: what the dashboard lists and counts, the
//! actions it takes on jobs (retry, cancel), and spawn progress events.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::{
    JobKind, JobRow, JobState, ServerRow, StoreError,
    accounts::Page,
    accounts::like_pattern,
    db::{Db, Dialect, each, execute, locking, now},
    servers::{count_end, release_admission},
};

/// The filter every job listing and bulk action shares; `$1…$5` are kind, state,
/// user, since and until, each ignored when null.
const JOB_FILTER: &str = "($1 is null or kind = $1) and ($2 is null or state = $2) \
     and ($3 is null or user_name = $3) and ($4 is null or created_at >= $4) \
     and ($5 is null or created_at < $5)";

/// Binds a `JobFilter` to `JOB_FILTER`'s five parameters.
macro_rules! job_filter {
    ($query:expr, $f:expr) => {
        $query
            .bind(&$f.kind)
            .bind(&$f.state)
            .bind(&$f.user)
            .bind($f.since)
            .bind($f.until)
    };
}

/// One step of a spawn, in JupyterHub's progress-event shape.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct SpawnEvent {
    #[serde(skip)]
    pub id: i64,
    #[serde(skip)]
    pub job_id: Uuid,
    pub progress: i16,
    pub message: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ready: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub failed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip)]
    pub created_at: DateTime<Utc>,
}

/// What a worker reports about a spawn it runs.
#[derive(Debug, Clone, Default)]
pub struct ProgressStep {
    pub progress: i16,
    pub message: String,
    pub ready: bool,
    pub failed: bool,
    pub url: Option<String>,
}

impl ProgressStep {
    pub fn at(progress: i16, message: impl Into<String>) -> Self {
        Self {
            progress,
            message: message.into(),
            ..Default::default()
        }
    }

    /// The last event of a spawn that failed.
    pub fn failed(error: &str) -> Self {
        Self {
            progress: 100,
            message: format!("spawn failed: {error}"),
            failed: true,
            ..Default::default()
        }
    }
}

/// The NOTIFY channel that announces a new progress event (payload: the job id).
/// Refuses to cancel a job that has started, or a user's removal (its user is
/// half gone already); both stores check this before they change anything.
pub(crate) fn ensure_cancellable(job: &JobRow) -> Result<(), StoreError> {
    if job.state != JobState::Queued {
        return Err(StoreError::Conflict(format!(
            "the job is {}; only a job that has not started can be cancelled",
            job.state
        )));
    }
    if job.kind == JobKind::Cleanup {
        return Err(StoreError::Conflict(
            "a user's removal cannot be cancelled once requested".into(),
        ));
    }
    Ok(())
}

/// The kind of a job that is repeated as it was (the scheduled ones); a user's
/// job is retried through the checks of a new request instead.
pub(crate) fn repeatable_kind(of: &JobRow) -> Result<JobKind, StoreError> {
    match of.kind {
        JobKind::Cull | JobKind::ExpireSessions | JobKind::Archive => Ok(of.kind),
        JobKind::Spawn | JobKind::Stop | JobKind::Cleanup => Err(StoreError::Conflict(format!(
            "a {} job is not repeated as it was",
            of.kind
        ))),
    }
}

pub const PROGRESS_CHANNEL: &str = "berth_progress";

/// Which jobs a listing or a bulk action covers; every part is optional.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub kind: Option<String>,
    pub state: Option<String>,
    pub user: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// Which servers a listing shows.
#[derive(Debug, Clone, Default)]
pub struct ServerFilter {
    pub state: Option<String>,
    /// Part of the owner's name.
    pub user: Option<String>,
    /// The profile it was requested with, exactly.
    pub profile: Option<String>,
}

/// How many jobs of a kind are in a state.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobCount {
    pub kind: JobKind,
    pub state: JobState,
    pub count: i64,
}

/// How many servers are in a state.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StateCount {
    pub state: crate::ServerState,
    pub count: i64,
}

/// A server row with the facts the dashboard shows beside it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ServerListing {
    #[sqlx(flatten)]
    pub server: ServerRow,
    pub mem_limit: Option<i64>,
    pub cpu_limit: Option<f32>,
}

/// One minute's reading of the platform, for the dashboard's charts.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Sample {
    pub at: DateTime<Utc>,
    /// Jobs waiting for a worker, every kind.
    pub queued: i64,
    pub spawns_in_flight: i64,
    pub active_servers: i64,
}

/// A job that ended: what it was, when it was asked for, when it ended, and how.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EndedJob {
    pub kind: JobKind,
    pub created_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub state: JobState,
}

/// How long samples are kept.
const SAMPLES_KEPT: chrono::TimeDelta = chrono::TimeDelta::days(8);

#[async_trait]
pub trait Console: Send + Sync + 'static {
    /// Records this minute's sample unless another process already did; false then.
    /// Drops samples older than eight days.
    async fn record_sample(&self) -> Result<bool, StoreError>;
    /// Samples since `since`, oldest first.
    async fn samples_since(&self, since: DateTime<Utc>) -> Result<Vec<Sample>, StoreError>;
    /// Jobs that ended (succeeded, failed or cancelled) since `since`, oldest first.
    async fn jobs_ended_since(&self, since: DateTime<Utc>) -> Result<Vec<EndedJob>, StoreError>;

    /// Appends a progress event to a spawn and announces it.
    async fn record_progress(&self, job_id: Uuid, step: &ProgressStep) -> Result<(), StoreError>;
    /// Passes on the id of every job with a new progress event, from any process,
    /// until `shutdown` fires; reconnects after a lost connection.
    async fn relay_progress(
        &self,
        to: tokio::sync::broadcast::Sender<Uuid>,
        shutdown: tokio_util::sync::CancellationToken,
    );
    /// The spawn's events after `after` (an event id), oldest first.
    async fn progress_after(&self, job_id: Uuid, after: i64)
    -> Result<Vec<SpawnEvent>, StoreError>;

    /// Jobs matching `filter`, newest first, and how many match.
    async fn jobs_page(
        &self,
        filter: &JobFilter,
        offset: i64,
        limit: i64,
    ) -> Result<Page<JobRow>, StoreError>;
    /// Ids of jobs matching `filter` (for bulk actions), newest first, at most `limit`.
    async fn job_ids(&self, filter: &JobFilter, limit: i64) -> Result<Vec<Uuid>, StoreError>;
    /// Jobs by kind and state.
    async fn job_counts(&self) -> Result<Vec<JobCount>, StoreError>;
    /// Servers by state.
    async fn server_counts(&self) -> Result<Vec<StateCount>, StoreError>;
    /// Jobs that failed since `since`.
    async fn failures_since(&self, since: DateTime<Utc>) -> Result<i64, StoreError>;
    /// Cancels a job that has not started: a waiting spawn leaves its server
    /// stopped (its place given back), a waiting stop leaves its server running.
    /// Conflict when the job has started or ended, or cannot be undone (a cleanup).
    async fn cancel_job(&self, id: Uuid, by: &str) -> Result<JobRow, StoreError>;
    /// Marks `retry` as the retry of `of`.
    async fn link_retry(&self, retry: Uuid, of: Uuid) -> Result<(), StoreError>;
    /// A new job with the kind, owner and payload of `of` (scheduled kinds only).
    async fn repeat_job(&self, of: &JobRow) -> Result<JobRow, StoreError>;

    async fn servers_page(
        &self,
        filter: &ServerFilter,
        offset: i64,
        limit: i64,
    ) -> Result<Page<ServerListing>, StoreError>;
}

#[async_trait]
impl Console for Db {
    async fn record_sample(&self) -> Result<bool, StoreError> {
        use chrono::DurationRound;
        let at = now();
        let minute = at
            .duration_trunc(chrono::TimeDelta::minutes(1))
            .unwrap_or(at);
        let taken: i64 = each!(self.pool(), p => sqlx::query_scalar(
            "select count(*) from platform_samples where at = $1",
        )
        .bind(minute)
        .fetch_one(p)
        .await)?;
        if taken > 0 {
            return Ok(false);
        }
        let usage = crate::platform::Platform::usage(self).await?;
        let queued: i64 = each!(self.pool(), p => sqlx::query_scalar(
            "select count(*) from jobs where state = 'queued'",
        )
        .fetch_one(p)
        .await)?;
        let written = each!(self.pool(), p => sqlx::query(
            "insert into platform_samples (at, queued, spawns_in_flight, active_servers) \
             values ($1, $2, $3, $4) on conflict (at) do nothing",
        )
        .bind(minute)
        .bind(queued)
        .bind(usage.spawns_in_flight)
        .bind(usage.active_servers)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        if written > 0 {
            each!(self.pool(), p => sqlx::query("delete from platform_samples where at < $1")
                .bind(minute - SAMPLES_KEPT)
                .execute(p)
                .await
                .map(drop))?;
        }
        Ok(written > 0)
    }

    async fn samples_since(&self, since: DateTime<Utc>) -> Result<Vec<Sample>, StoreError> {
        Ok(each!(self.pool(), p => sqlx::query_as::<_, Sample>(
            "select at, queued, spawns_in_flight, active_servers from platform_samples \
             where at >= $1 order by at",
        )
        .bind(since)
        .fetch_all(p)
        .await)?)
    }

    async fn jobs_ended_since(&self, since: DateTime<Utc>) -> Result<Vec<EndedJob>, StoreError> {
        Ok(each!(self.pool(), p => sqlx::query_as::<_, EndedJob>(
            "select kind, created_at, finished_at, state from jobs \
             where finished_at >= $1 order by finished_at",
        )
        .bind(since)
        .fetch_all(p)
        .await)?)
    }

    async fn record_progress(&self, job_id: Uuid, step: &ProgressStep) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        tx.insert_progress(job_id, step).await?;
        tx.commit().await
    }

    async fn relay_progress(
        &self,
        to: tokio::sync::broadcast::Sender<Uuid>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        match self.on() {
            // A stream that missed some polls every second anyway.
            Dialect::Pg(s) => {
                relay_notifications(
                    s.pool(),
                    PROGRESS_CHANNEL,
                    &shutdown,
                    || {},
                    |payload| {
                        if let Ok(job) = payload.parse::<Uuid>() {
                            let _ = to.send(job);
                        }
                    },
                )
                .await
            }
            Dialect::Lite(s) => {
                let mut heard = s.progress();
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
        }
    }

    async fn progress_after(
        &self,
        job_id: Uuid,
        after: i64,
    ) -> Result<Vec<SpawnEvent>, StoreError> {
        Ok(each!(self.pool(), p => sqlx::query_as::<_, SpawnEvent>(
            "select * from spawn_events where job_id = $1 and id > $2 order by id",
        )
        .bind(job_id)
        .bind(after)
        .fetch_all(p)
        .await)?)
    }

    async fn jobs_page(
        &self,
        filter: &JobFilter,
        offset: i64,
        limit: i64,
    ) -> Result<Page<JobRow>, StoreError> {
        let items = each!(self.pool(), p => job_filter!(
            sqlx::query_as::<_, JobRow>(sqlx::AssertSqlSafe(format!(
                "select * from jobs where {JOB_FILTER} \
                 order by created_at desc, id desc limit $7 offset $6"
            ))),
            filter
        )
        .bind(offset)
        .bind(limit)
        .fetch_all(p)
        .await)?;
        let total: i64 = each!(self.pool(), p => job_filter!(
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "select count(*) from jobs where {JOB_FILTER}"
            ))),
            filter
        )
        .fetch_one(p)
        .await)?;
        Ok(Page { items, total })
    }

    async fn job_ids(&self, filter: &JobFilter, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        Ok(each!(self.pool(), p => job_filter!(
            sqlx::query_scalar::<_, Uuid>(sqlx::AssertSqlSafe(format!(
                "select id from jobs where {JOB_FILTER} \
                 order by created_at desc, id desc limit $6"
            ))),
            filter
        )
        .bind(limit)
        .fetch_all(p)
        .await)?)
    }

    async fn job_counts(&self) -> Result<Vec<JobCount>, StoreError> {
        Ok(each!(self.pool(), p => sqlx::query_as::<_, JobCount>(
            "select kind, state, count(*) as count from jobs group by kind, state \
             order by kind, state",
        )
        .fetch_all(p)
        .await)?)
    }

    async fn server_counts(&self) -> Result<Vec<StateCount>, StoreError> {
        Ok(each!(self.pool(), p => sqlx::query_as::<_, StateCount>(
            "select state, count(*) as count from servers group by state order by state",
        )
        .fetch_all(p)
        .await)?)
    }

    async fn failures_since(&self, since: DateTime<Utc>) -> Result<i64, StoreError> {
        Ok(each!(self.pool(), p => sqlx::query_scalar(
            "select count(*) from jobs where finished_at >= $1 and state = 'failed'",
        )
        .bind(since)
        .fetch_one(p)
        .await)?)
    }

    async fn cancel_job(&self, id: Uuid, by: &str) -> Result<JobRow, StoreError> {
        let at = now();
        let mut tx = self.begin().await?;
        let job: Option<JobRow> = locking!(
            tx,
            "select * from jobs where id = $1",
            "for update",
            |c, sql| sqlx::query_as(sql).bind(id).fetch_optional(c).await
        )?;
        let job = job.ok_or_else(|| StoreError::NotFound(format!("no job {id}")))?;
        ensure_cancellable(&job)?;
        let reason = format!("cancelled by {by}");
        match job.kind {
            JobKind::Spawn => {
                // The server was waiting on this spawn: it is stopped, its place given back.
                let servers: Vec<i64> = each!(tx.conn(), c => sqlx::query_scalar(
                    "update servers set state = 'stopped', stopped_at = $2, updated_at = $2 \
                     where spawn_job_id = $1 and state = 'pending_spawn' returning id",
                )
                .bind(id)
                .bind(at)
                .fetch_all(c)
                .await)?;
                for server in servers {
                    release_admission(&mut tx, server).await?;
                    tx.route_changed(server);
                }
                let step = ProgressStep {
                    progress: 100,
                    message: format!("the spawn was {reason}"),
                    failed: true,
                    ..Default::default()
                };
                tx.insert_progress(id, &step).await?;
            }
            JobKind::Stop => {
                // A stop of a running server is undone; one that interrupts a spawn is not
                // (the spawn has already seen it and is giving up).
                let server: Option<(i64, bool)> = locking!(
                    tx,
                    "select id, container_id is not null and started_at is not null \
                     from servers where stop_job_id = $1 and state = 'pending_stop'",
                    "for update",
                    |c, sql| sqlx::query_as(sql).bind(id).fetch_optional(c).await
                )?;
                match server {
                    Some((server, true)) => {
                        execute!(
                            tx.conn(),
                            "update servers set state = 'running', stop_job_id = null, \
                             updated_at = $2 where id = $1",
                            server,
                            at
                        )?;
                        tx.route_changed(server);
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
        let job = each!(tx.conn(), c => sqlx::query_as::<_, JobRow>(
            "update jobs set state = 'cancelled', last_error = $2, finished_at = $3 \
             where id = $1 returning *",
        )
        .bind(id)
        .bind(&reason)
        .bind(at)
        .fetch_one(c)
        .await)?;
        self.queue().withdraw(tx.conn(), id).await?;
        tx.commit().await?;
        count_end(&job);
        Ok(job)
    }

    async fn link_retry(&self, retry: Uuid, of: Uuid) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        execute!(
            tx.conn(),
            "update jobs set retry_of = $2 where id = $1",
            retry,
            of
        )?;
        tx.commit().await
    }

    async fn repeat_job(&self, of: &JobRow) -> Result<JobRow, StoreError> {
        let kind = repeatable_kind(of)?;
        let mut tx = self.begin().await?;
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
        Ok(job)
    }

    async fn servers_page(
        &self,
        filter: &ServerFilter,
        offset: i64,
        limit: i64,
    ) -> Result<Page<ServerListing>, StoreError> {
        let pattern = filter.user.as_deref().map(like_pattern);
        let items = each!(self.pool(), p => sqlx::query_as::<_, ServerListing>(select_servers!(
            "where ($1 is null or s.state = $1) and ($2 is null or u.name like $2 escape '\\') \
             and ($5 is null or s.profile = $5) \
             order by s.updated_at desc, s.id desc limit $4 offset $3"
        ))
        .bind(&filter.state)
        .bind(&pattern)
        .bind(offset)
        .bind(limit)
        .bind(&filter.profile)
        .fetch_all(p)
        .await)?;
        let total: i64 = each!(self.pool(), p => sqlx::query_scalar(
            "select count(*) from servers s join users u on u.id = s.user_id \
             where ($1 is null or s.state = $1) and ($2 is null or u.name like $2 escape '\\') \
             and ($3 is null or s.profile = $3)",
        )
        .bind(&filter.state)
        .bind(&pattern)
        .bind(&filter.profile)
        .fetch_one(p)
        .await)?;
        Ok(Page { items, total })
    }
}

/// A Postgres channel's notifications, each handed to `heard`, until `shutdown`; a
/// lost listener is connected again after a second, and `listening` is called
/// whenever it listens (again), since notifications sent meanwhile are lost.
pub(crate) async fn relay_notifications(
    pool: &sqlx::PgPool,
    channel: &str,
    shutdown: &tokio_util::sync::CancellationToken,
    listening: impl Fn(),
    heard: impl Fn(&str),
) {
    while !shutdown.is_cancelled() {
        let relay = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
            listener.listen(channel).await?;
            listening();
            loop {
                let note = listener.recv().await?;
                heard(note.payload());
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            result = relay => if let Err(e) = result {
                tracing::warn!(channel, error = %e, "notifications lost; listening again in a second");
            },
            _ = shutdown.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
