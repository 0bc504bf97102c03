//! The Postgres store.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    console::ProgressStep,
    jobs::{CleanupJob, JobEnvelope, JobKind, JobOutcome, JobRow, ServerJob},
    names::{ServerName, UserName},
    pg_console::insert_progress,
    pg_locks::{SERVER_LOCK_SPACE, SessionLock, lock_key},
    queue::Queue,
    rows::{ServerRow, ServerState, UserRow},
    store::{Running, ServerLock, SpawnOutcome, SpawnRequest, StopOutcome, Store, StoreError},
    telemetry,
};

/// A static query over servers joined with their owner; `$tail` filters and orders.
macro_rules! select_servers {
    ($tail:literal) => {
        concat!(
            "select s.id, s.user_id, u.name as user_name, s.name, s.state, s.image, ",
            "s.spawn_job_id, s.stop_job_id, s.container_id, s.url, s.error, s.requested_at, ",
            "s.started_at, s.stopped_at, s.last_activity, s.warning, s.mem_limit, s.cpu_limit ",
            "from servers s join users u on u.id = s.user_id ",
            $tail
        )
    };
}

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    queue: Arc<dyn Queue>,
}

impl PgStore {
    pub fn new(pool: PgPool, queue: Arc<dyn Queue>) -> Self {
        Self { pool, queue }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(crate) fn queue(&self) -> &dyn Queue {
        self.queue.as_ref()
    }

    pub(crate) async fn insert_job(
        &self,
        tx: &mut PgConnection,
        kind: JobKind,
        user: &str,
        server: Option<&str>,
        payload: serde_json::Value,
    ) -> Result<JobRow, StoreError> {
        self.insert_job_as(tx, Uuid::now_v7(), kind, user, server, payload)
            .await
    }

    /// `insert_job` with an id chosen beforehand (a schedule's tick names its job).
    pub(crate) async fn insert_job_as(
        &self,
        tx: &mut PgConnection,
        id: Uuid,
        kind: JobKind,
        user: &str,
        server: Option<&str>,
        payload: serde_json::Value,
    ) -> Result<JobRow, StoreError> {
        let job = sqlx::query_as::<_, JobRow>(
            "insert into jobs (id, kind, user_name, server_name, payload) \
             values ($1, $2, $3, $4, $5) returning *",
        )
        .bind(id)
        .bind(kind.as_str())
        .bind(user)
        .bind(server)
        .bind(payload)
        .fetch_one(&mut *tx)
        .await?;
        self.queue
            .enqueue(tx, &JobEnvelope { job_id: id, kind })
            .await?;
        telemetry::job_enqueued(kind.as_str());
        Ok(job)
    }
}

async fn server_for_update(
    tx: &mut PgConnection,
    user: &UserName,
    server: &ServerName,
) -> Result<Option<ServerRow>, sqlx::Error> {
    sqlx::query_as::<_, ServerRow>(select_servers!(
        "where u.name = $1 and s.name = $2 for update of s"
    ))
    .bind(user.as_str())
    .bind(server.as_str())
    .fetch_optional(tx)
    .await
}

async fn server_in(tx: &mut PgConnection, id: i64) -> Result<ServerRow, sqlx::Error> {
    sqlx::query_as::<_, ServerRow>(select_servers!("where s.id = $1"))
        .bind(id)
        .fetch_one(tx)
        .await
}

#[async_trait]
impl Store for PgStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("select 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_user(&self, name: &UserName, admin: bool) -> Result<UserRow, StoreError> {
        let row = sqlx::query_as::<_, UserRow>(
            "insert into users (name, role) values ($1, $2) on conflict (name) do nothing returning *",
        )
        .bind(name.as_str())
        .bind(if admin { "admin" } else { "user" })
        .fetch_optional(&self.pool)
        .await?;
        row.ok_or_else(|| StoreError::Conflict(format!("user {name:?} already exists")))
    }

    async fn get_user(&self, name: &UserName) -> Result<Option<UserRow>, StoreError> {
        crate::reads::pg::get_user(self.pool(), name).await
    }

    async fn list_users(&self) -> Result<Vec<UserRow>, StoreError> {
        crate::reads::pg::list_users(self.pool()).await
    }

    async fn servers_of(&self, user_ids: &[i64]) -> Result<Vec<ServerRow>, StoreError> {
        Ok(sqlx::query_as::<_, ServerRow>(select_servers!(
            "where s.user_id = any($1) order by s.user_id, s.name"
        ))
        .bind(user_ids)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn get_server(
        &self,
        user: &UserName,
        server: &ServerName,
    ) -> Result<Option<ServerRow>, StoreError> {
        crate::reads::pg::get_server(self.pool(), user, server).await
    }

    async fn request_spawn(&self, req: SpawnRequest) -> Result<SpawnOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Locking the user serialises one user's spawn requests, so the per-user
        // count below is exact, and keeps a concurrent delete from slipping in.
        let (user_id, user_state, limit): (i64, String, i32) = sqlx::query_as(
            "select u.id, u.state, coalesce((select active_server_limit from platform_limits), $2) \
             from users u where u.name = $1 for update of u",
        )
        .bind(req.user.as_str())
        .bind(req.active_server_limit as i32)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::no_user(&req.user))?;
        if user_state == "deleting" {
            return Err(StoreError::Conflict(format!(
                "user {:?} is being deleted",
                req.user.as_str()
            )));
        }
        // Creates the row on first use and locks it either way, in one statement.
        let server = sqlx::query_as::<_, ServerRow>(
            "insert into servers as s (user_id, name, state) values ($1, $2, 'stopped') \
             on conflict (user_id, name) do update set updated_at = s.updated_at \
             returning s.id, s.user_id, $3::text as user_name, s.name, s.state, s.image, \
             s.spawn_job_id, s.stop_job_id, s.container_id, s.url, s.error, s.requested_at, \
             s.started_at, s.stopped_at, s.last_activity, s.warning",
        )
        .bind(user_id)
        .bind(req.server.as_str())
        .bind(req.user.as_str())
        .fetch_one(&mut *tx)
        .await?;
        match server.state() {
            ServerState::PendingSpawn => return Ok(SpawnOutcome::AlreadyPending(server)),
            ServerState::Running => return Ok(SpawnOutcome::AlreadyRunning(server)),
            ServerState::PendingStop => {
                return Err(StoreError::Conflict(
                    "the server is stopping; start it again once it has stopped".into(),
                ));
            }
            ServerState::Stopped | ServerState::Failed => {}
        }
        if let Some(limit) = req.max_servers_per_user {
            let live: i64 = sqlx::query_scalar(
                "select count(*) from servers where user_id = $1 \
                 and state in ('pending_spawn', 'running', 'pending_stop')",
            )
            .bind(user_id)
            .fetch_one(&mut *tx)
            .await?;
            if live >= i64::from(limit) {
                return Err(StoreError::Limit(format!(
                    "user {:?} already has {live} servers, the most allowed per user is {limit}; \
                     stop one first",
                    req.user.as_str()
                )));
            }
        }
        if !claim_admission(&mut tx, server.id, limit).await? {
            let active: i64 = sqlx::query_scalar(
                "select count(*) from admission_tokens where server_id is not null",
            )
            .fetch_one(&mut *tx)
            .await?;
            return Err(StoreError::Limit(format!(
                "the platform is full: {active} of {limit} servers are active; try again when one stops"
            )));
        }
        let payload = serde_json::to_value(ServerJob {
            server_id: server.id,
        })
        .expect("payload serialises");
        let job = self
            .insert_job(
                &mut tx,
                JobKind::Spawn,
                req.user.as_str(),
                Some(req.server.as_str()),
                payload,
            )
            .await?;
        let server = sqlx::query_as::<_, ServerRow>(
            "update servers s set state = 'pending_spawn', spawn_job_id = $2, stop_job_id = null, \
             image = $3, error = null, url = null, container_id = null, started_at = null, \
             stopped_at = null, requested_at = now(), updated_at = now() where s.id = $1 \
             returning s.id, s.user_id, $4::text as user_name, s.name, s.state, s.image, \
             s.spawn_job_id, s.stop_job_id, s.container_id, s.url, s.error, s.requested_at, \
             s.started_at, s.stopped_at, s.last_activity, s.warning",
        )
        .bind(server.id)
        .bind(job.id)
        .bind(&req.image)
        .bind(req.user.as_str())
        .fetch_one(&mut *tx)
        .await?;
        insert_progress(
            &mut tx,
            job.id,
            &ProgressStep::at(0, "server requested; waiting for a worker"),
        )
        .await?;
        tx.commit().await?;
        self.queue.flush().await;
        Ok(SpawnOutcome::Enqueued(server))
    }

    async fn request_stop(
        &self,
        user: &UserName,
        server: &ServerName,
    ) -> Result<StopOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = server_for_update(&mut tx, user, server)
            .await?
            .ok_or_else(|| {
                StoreError::NotFound(format!("user {user:?} has no server {server:?}"))
            })?;
        match row.state() {
            ServerState::Stopped | ServerState::Failed => return Ok(StopOutcome::NotRunning(row)),
            ServerState::PendingStop => return Ok(StopOutcome::AlreadyStopping(row)),
            ServerState::PendingSpawn | ServerState::Running => {}
        }
        let payload = serde_json::to_value(ServerJob { server_id: row.id }).expect("serialises");
        let job = self
            .insert_job(
                &mut tx,
                JobKind::Stop,
                user.as_str(),
                Some(server.as_str()),
                payload,
            )
            .await?;
        sqlx::query(
            "update servers set state = 'pending_stop', stop_job_id = $2, updated_at = now() \
             where id = $1",
        )
        .bind(row.id)
        .bind(job.id)
        .execute(&mut *tx)
        .await?;
        let row = server_in(&mut tx, row.id).await?;
        tx.commit().await?;
        self.queue.flush().await;
        Ok(StopOutcome::Enqueued(row))
    }

    async fn request_user_removal(&self, user: &UserName) -> Result<JobRow, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query_as::<_, UserRow>("select * from users where name = $1 for update")
            .bind(user.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::no_user(user))?;
        if let (Some(id), "deleting") = (row.cleanup_job_id, row.state.as_str()) {
            let job = sqlx::query_as::<_, JobRow>("select * from jobs where id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            // A removal still under way is the answer; one that failed (or was
            // archived) is requested anew below.
            if let Some(job) = job.filter(|j| j.state == "queued" || j.state == "running") {
                return Ok(job);
            }
        }
        let payload = serde_json::to_value(CleanupJob { user_id: row.id }).expect("serialises");
        let job = self
            .insert_job(&mut tx, JobKind::Cleanup, user.as_str(), None, payload)
            .await?;
        sqlx::query("update users set state = 'deleting', cleanup_job_id = $2 where id = $1")
            .bind(row.id)
            .bind(job.id)
            .execute(&mut *tx)
            .await?;
        // Stop wins over any spawn in flight: it sees the state change and gives up.
        sqlx::query(
            "update servers set state = 'pending_stop', updated_at = now() \
             where user_id = $1 and state in ('pending_spawn', 'running')",
        )
        .bind(row.id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.queue.flush().await;
        Ok(job)
    }

    async fn get_job(&self, id: Uuid) -> Result<Option<JobRow>, StoreError> {
        crate::reads::pg::get_job(self.pool(), id).await
    }

    async fn begin_job(&self, id: Uuid, worker: &str) -> Result<Option<JobRow>, StoreError> {
        let job = sqlx::query_as::<_, JobRow>(
            "update jobs set state = 'running', attempts = attempts + 1, worker = $2, \
             started_at = coalesce(started_at, now()) \
             where id = $1 and state in ('queued', 'running') returning *",
        )
        .bind(id)
        .bind(worker)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(job) = job.as_ref().filter(|j| j.attempts == 1) {
            telemetry::job_started(&job.kind);
        }
        Ok(job)
    }

    async fn finish_job(&self, id: Uuid, outcome: &JobOutcome) -> Result<(), StoreError> {
        let (state, error) = match outcome {
            JobOutcome::Succeeded => ("succeeded", None),
            JobOutcome::Cancelled(why) => ("cancelled", Some(why.as_str())),
            JobOutcome::Failed(why) => ("failed", Some(why.as_str())),
        };
        let mut conn = self.pool.acquire().await?;
        end_job(&mut conn, id, state, error).await
    }

    async fn dead_letter(&self, id: Uuid, error: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(ended) = sqlx::query_as::<_, JobRow>(
            "update jobs set state = 'failed', last_error = $2, finished_at = now() \
             where id = $1 and state in ('queued', 'running') returning *",
        )
        .bind(id)
        .bind(error)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(false);
        };
        // The server this job was to move on is stuck without it: it fails, keeping
        // the error, and the reconciler removes any container it has left.
        let servers: Vec<i64> = sqlx::query_scalar(
            "update servers set state = 'failed', error = $2, updated_at = now(), \
             stopped_at = now(), url = null \
             where (spawn_job_id = $1 and state = 'pending_spawn') \
                or (stop_job_id = $1 and state = 'pending_stop') \
             returning id",
        )
        .bind(id)
        .bind(error)
        .fetch_all(&mut *tx)
        .await?;
        for server in servers {
            release_admission(&mut tx, server).await?;
        }
        if ended.kind == JobKind::Spawn.as_str() {
            insert_progress(&mut tx, id, &ProgressStep::failed(error)).await?;
        }
        tx.commit().await?;
        count_end(&ended);
        Ok(true)
    }

    async fn note_retry(&self, id: Uuid, error: &str) -> Result<(), StoreError> {
        sqlx::query("update jobs set attempts = attempts + 1, last_error = $2 where id = $1 and state = 'running'")
            .bind(id)
            .bind(error)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn lock_server(&self, server_id: i64) -> Result<Box<dyn ServerLock>, StoreError> {
        SessionLock::take(&self.pool, SERVER_LOCK_SPACE, lock_key(server_id)).await
    }

    async fn server_by_id(&self, server_id: i64) -> Result<Option<ServerRow>, StoreError> {
        crate::reads::pg::server_by_id(self.pool(), server_id).await
    }

    async fn servers_of_user(&self, user_id: i64) -> Result<Vec<ServerRow>, StoreError> {
        self.servers_of(&[user_id]).await
    }

    async fn mark_running(&self, r: &Running) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "update servers set state = 'running', container_id = $3, url = $4, token_hash = $5, \
             started_at = now(), last_activity = now(), error = null, warning = null, warned_at = null, \
             mem_limit = $6, cpu_limit = $7, updated_at = now() \
             where id = $1 and spawn_job_id = $2 and state = 'pending_spawn'",
        )
        .bind(r.server_id)
        .bind(r.job_id)
        .bind(&r.container_id)
        .bind(&r.url)
        .bind(&r.token_hash)
        .bind(r.mem_limit)
        .bind(r.cpu_limit)
        .execute(&mut *tx)
        .await?;
        let done = done.rows_affected() == 1;
        if done {
            end_job(&mut tx, r.job_id, "succeeded", None).await?;
            let ready = ProgressStep {
                progress: 100,
                message: format!("server ready at {}", r.url),
                ready: true,
                url: Some(r.url.clone()),
                ..Default::default()
            };
            insert_progress(&mut tx, r.job_id, &ready).await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    async fn mark_spawn_failed(
        &self,
        server_id: i64,
        job_id: Uuid,
        error: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "update servers set state = 'failed', error = $3, url = null, container_id = null, \
             stopped_at = now(), updated_at = now() \
             where id = $1 and spawn_job_id = $2 and state = 'pending_spawn'",
        )
        .bind(server_id)
        .bind(job_id)
        .bind(error)
        .execute(&mut *tx)
        .await?;
        let done = done.rows_affected() == 1;
        if done {
            end_job(&mut tx, job_id, "failed", Some(error)).await?;
            release_admission(&mut tx, server_id).await?;
            insert_progress(&mut tx, job_id, &ProgressStep::failed(error)).await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    async fn mark_stopped(
        &self,
        server_id: i64,
        stop_job: Option<Uuid>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "update servers set state = 'stopped', url = null, container_id = null, \
             token_hash = null, stopped_at = now(), updated_at = now() \
             where id = $1 and state = 'pending_stop' and ($2::uuid is null or stop_job_id = $2)",
        )
        .bind(server_id)
        .bind(stop_job)
        .execute(&mut *tx)
        .await?;
        let done = done.rows_affected() == 1;
        if done {
            release_admission(&mut tx, server_id).await?;
        }
        if let (true, Some(job)) = (done, stop_job) {
            end_job(&mut tx, job, "succeeded", None).await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    async fn delete_user(&self, user_id: i64, job_id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query("delete from users where id = $1 and cleanup_job_id = $2")
            .bind(user_id)
            .bind(job_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// Claims a free place below `limit` for the server, creating the places on first
/// use. Concurrent claims skip each other's rows instead of queueing.
async fn claim_admission(
    tx: &mut PgConnection,
    server_id: i64,
    limit: i32,
) -> Result<bool, StoreError> {
    for provisioned in [false, true] {
        let claimed: Option<i32> = sqlx::query_scalar(
            "update admission_tokens set server_id = $1 where slot = ( \
               select slot from admission_tokens where server_id is null and slot < $2 \
               order by slot limit 1 for update skip locked) returning slot",
        )
        .bind(server_id)
        .bind(limit)
        .fetch_optional(&mut *tx)
        .await?;
        if claimed.is_some() {
            return Ok(true);
        }
        if provisioned {
            break;
        }
        let places: i64 =
            sqlx::query_scalar("select count(*) from admission_tokens where slot < $1")
                .bind(limit)
                .fetch_one(&mut *tx)
                .await?;
        if places >= i64::from(limit) {
            break;
        }
        sqlx::query("insert into admission_tokens (slot) select generate_series(0, $1 - 1) on conflict do nothing")
            .bind(limit)
            .execute(&mut *tx)
            .await?;
    }
    Ok(false)
}

/// Gives a server's admission place back.
pub(crate) async fn release_admission(
    conn: &mut PgConnection,
    server_id: i64,
) -> Result<(), StoreError> {
    sqlx::query("update admission_tokens set server_id = null where server_id = $1")
        .bind(server_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Ends a job that has not ended yet. The worker's server transitions end their
/// job in the same transaction, so nobody ever sees a running server whose spawn
/// job still runs; the handler's own report afterwards changes nothing.
async fn end_job(
    conn: &mut PgConnection,
    id: Uuid,
    state: &str,
    error: Option<&str>,
) -> Result<(), StoreError> {
    let ended = sqlx::query_as::<_, JobRow>(
        "update jobs set state = $2, last_error = coalesce($3, last_error), finished_at = now() \
         where id = $1 and state in ('queued', 'running') returning *",
    )
    .bind(id)
    .bind(state)
    .bind(error)
    .fetch_optional(conn)
    .await?;
    if let Some(job) = ended {
        count_end(&job);
    }
    Ok(())
}

/// Counts a job that has just reached its final state.
pub(crate) fn count_end(job: &JobRow) {
    telemetry::job_ended(
        &job.kind,
        &job.state,
        job.created_at,
        job.started_at,
        job.finished_at.unwrap_or_else(chrono::Utc::now),
    );
}
