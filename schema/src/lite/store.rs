//! `Store` on SQLite.

use async_trait::async_trait;
use uuid::Uuid;

use super::{SqliteStore, Tx, json_list, now};
use crate::{
    console::ProgressStep,
    jobs::{CleanupJob, JobKind, JobOutcome, JobRow, ServerJob},
    names::{ServerName, UserName},
    pg::count_end,
    rows::{ServerRow, ServerState, UserRow},
    store::{Running, ServerLock, SpawnOutcome, SpawnRequest, StopOutcome, Store, StoreError},
    telemetry,
};

pub(crate) async fn server_in(tx: &mut Tx, id: i64) -> Result<ServerRow, sqlx::Error> {
    sqlx::query_as::<_, ServerRow>(select_servers!("where s.id = $1"))
        .bind(id)
        .fetch_one(&mut *tx.tx)
        .await
}

/// Gives a server's admission place back.
pub(crate) async fn release_admission(tx: &mut Tx, server_id: i64) -> Result<(), StoreError> {
    sqlx::query("update admission_tokens set server_id = null where server_id = $1")
        .bind(server_id)
        .execute(&mut *tx.tx)
        .await?;
    Ok(())
}

/// Creates the admission places below `limit` that do not exist yet.
pub(crate) async fn provision_admission(tx: &mut Tx, limit: i32) -> Result<(), StoreError> {
    sqlx::query(
        "with recursive n(slot) as (select 0 union all select slot + 1 from n where slot + 1 < $1) \
         insert or ignore into admission_tokens (slot) select slot from n where $1 > 0",
    )
    .bind(limit)
    .execute(&mut *tx.tx)
    .await?;
    Ok(())
}

/// Claims a free place below `limit` for the server. Writers take turns, so the
/// first free place is free for this one.
async fn claim_admission(tx: &mut Tx, server_id: i64, limit: i32) -> Result<bool, StoreError> {
    provision_admission(tx, limit).await?;
    let claimed = sqlx::query(
        "update admission_tokens set server_id = $1 where slot = ( \
           select slot from admission_tokens where server_id is null and slot < $2 \
           order by slot limit 1)",
    )
    .bind(server_id)
    .bind(limit)
    .execute(&mut *tx.tx)
    .await?;
    Ok(claimed.rows_affected() == 1)
}

/// Ends a job that has not ended yet (see the Postgres store).
pub(crate) async fn end_job(
    tx: &mut Tx,
    id: Uuid,
    state: &str,
    error: Option<&str>,
) -> Result<(), StoreError> {
    let ended = sqlx::query_as::<_, JobRow>(
        "update jobs set state = $2, last_error = coalesce($3, last_error), finished_at = $4 \
         where id = $1 and state in ('queued', 'running') returning *",
    )
    .bind(id)
    .bind(state)
    .bind(error)
    .bind(now())
    .fetch_optional(&mut *tx.tx)
    .await?;
    if let Some(job) = ended {
        count_end(&job);
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("select 1").execute(self.pool()).await?;
        Ok(())
    }

    async fn create_user(&self, name: &UserName, admin: bool) -> Result<UserRow, StoreError> {
        let mut tx = self.write().await?;
        let row = sqlx::query_as::<_, UserRow>(
            "insert into users (name, role, created_at) values ($1, $2, $3) \
             on conflict (name) do nothing returning *",
        )
        .bind(name.as_str())
        .bind(if admin { "admin" } else { "user" })
        .bind(now())
        .fetch_optional(&mut *tx.tx)
        .await?;
        self.commit(tx).await?;
        row.ok_or_else(|| StoreError::Conflict(format!("user {name:?} already exists")))
    }

    async fn get_user(&self, name: &UserName) -> Result<Option<UserRow>, StoreError> {
        crate::reads::lite::get_user(self.pool(), name).await
    }

    async fn list_users(&self) -> Result<Vec<UserRow>, StoreError> {
        crate::reads::lite::list_users(self.pool()).await
    }

    async fn servers_of(&self, user_ids: &[i64]) -> Result<Vec<ServerRow>, StoreError> {
        Ok(sqlx::query_as::<_, ServerRow>(select_servers!(
            "where s.user_id in (select value from json_each($1)) order by s.user_id, s.name"
        ))
        .bind(json_list(user_ids))
        .fetch_all(self.pool())
        .await?)
    }

    async fn get_server(
        &self,
        user: &UserName,
        server: &ServerName,
    ) -> Result<Option<ServerRow>, StoreError> {
        crate::reads::lite::get_server(self.pool(), user, server).await
    }

    async fn request_spawn(&self, req: SpawnRequest) -> Result<SpawnOutcome, StoreError> {
        let mut tx = self.write().await?;
        let (user_id, user_state, limit): (i64, String, i32) = sqlx::query_as(
            "select u.id, u.state, coalesce((select active_server_limit from platform_limits), $2) \
             from users u where u.name = $1",
        )
        .bind(req.user.as_str())
        .bind(req.active_server_limit as i32)
        .fetch_optional(&mut *tx.tx)
        .await?
        .ok_or_else(|| StoreError::no_user(&req.user))?;
        if user_state == "deleting" {
            return Err(StoreError::Conflict(format!(
                "user {:?} is being deleted",
                req.user.as_str()
            )));
        }
        let at = now();
        let id: i64 = sqlx::query_scalar(
            "insert into servers (user_id, name, state, requested_at, created_at, updated_at) \
             values ($1, $2, 'stopped', $3, $3, $3) \
             on conflict (user_id, name) do update set updated_at = servers.updated_at \
             returning id",
        )
        .bind(user_id)
        .bind(req.server.as_str())
        .bind(at)
        .fetch_one(&mut *tx.tx)
        .await?;
        let server = server_in(&mut tx, id).await?;
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
            .fetch_one(&mut *tx.tx)
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
            .fetch_one(&mut *tx.tx)
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
        sqlx::query(
            "update servers set state = 'pending_spawn', spawn_job_id = $2, stop_job_id = null, \
             image = $3, error = null, url = null, container_id = null, started_at = null, \
             stopped_at = null, requested_at = $4, updated_at = $4 where id = $1",
        )
        .bind(server.id)
        .bind(job.id)
        .bind(&req.image)
        .bind(at)
        .execute(&mut *tx.tx)
        .await?;
        let server = server_in(&mut tx, server.id).await?;
        Self::insert_progress(
            &mut tx,
            job.id,
            &ProgressStep::at(0, "server requested; waiting for a worker"),
        )
        .await?;
        self.commit(tx).await?;
        Ok(SpawnOutcome::Enqueued(server))
    }

    async fn request_stop(
        &self,
        user: &UserName,
        server: &ServerName,
    ) -> Result<StopOutcome, StoreError> {
        let mut tx = self.write().await?;
        let row =
            sqlx::query_as::<_, ServerRow>(select_servers!("where u.name = $1 and s.name = $2"))
                .bind(user.as_str())
                .bind(server.as_str())
                .fetch_optional(&mut *tx.tx)
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
            "update servers set state = 'pending_stop', stop_job_id = $2, updated_at = $3 \
             where id = $1",
        )
        .bind(row.id)
        .bind(job.id)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        let row = server_in(&mut tx, row.id).await?;
        self.commit(tx).await?;
        Ok(StopOutcome::Enqueued(row))
    }

    async fn request_user_removal(&self, user: &UserName) -> Result<JobRow, StoreError> {
        let mut tx = self.write().await?;
        let row = sqlx::query_as::<_, UserRow>("select * from users where name = $1")
            .bind(user.as_str())
            .fetch_optional(&mut *tx.tx)
            .await?
            .ok_or_else(|| StoreError::no_user(user))?;
        if let (Some(id), "deleting") = (row.cleanup_job_id, row.state.as_str()) {
            let job = sqlx::query_as::<_, JobRow>("select * from jobs where id = $1")
                .bind(id)
                .fetch_optional(&mut *tx.tx)
                .await?;
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
            .execute(&mut *tx.tx)
            .await?;
        sqlx::query(
            "update servers set state = 'pending_stop', updated_at = $2 \
             where user_id = $1 and state in ('pending_spawn', 'running')",
        )
        .bind(row.id)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        self.commit(tx).await?;
        Ok(job)
    }

    async fn get_job(&self, id: Uuid) -> Result<Option<JobRow>, StoreError> {
        crate::reads::lite::get_job(self.pool(), id).await
    }

    async fn begin_job(&self, id: Uuid, worker: &str) -> Result<Option<JobRow>, StoreError> {
        let mut tx = self.write().await?;
        let job = sqlx::query_as::<_, JobRow>(
            "update jobs set state = 'running', attempts = attempts + 1, worker = $2, \
             started_at = coalesce(started_at, $3) \
             where id = $1 and state in ('queued', 'running') returning *",
        )
        .bind(id)
        .bind(worker)
        .bind(now())
        .fetch_optional(&mut *tx.tx)
        .await?;
        self.commit(tx).await?;
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
        let mut tx = self.write().await?;
        end_job(&mut tx, id, state, error).await?;
        self.commit(tx).await
    }

    async fn dead_letter(&self, id: Uuid, error: &str) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let at = now();
        let Some(ended) = sqlx::query_as::<_, JobRow>(
            "update jobs set state = 'failed', last_error = $2, finished_at = $3 \
             where id = $1 and state in ('queued', 'running') returning *",
        )
        .bind(id)
        .bind(error)
        .bind(at)
        .fetch_optional(&mut *tx.tx)
        .await?
        else {
            return Ok(false);
        };
        let servers: Vec<i64> = sqlx::query_scalar(
            "update servers set state = 'failed', error = $2, updated_at = $3, \
             stopped_at = $3, url = null \
             where (spawn_job_id = $1 and state = 'pending_spawn') \
                or (stop_job_id = $1 and state = 'pending_stop') \
             returning id",
        )
        .bind(id)
        .bind(error)
        .bind(at)
        .fetch_all(&mut *tx.tx)
        .await?;
        for server in servers {
            release_admission(&mut tx, server).await?;
        }
        if ended.kind == JobKind::Spawn.as_str() {
            Self::insert_progress(&mut tx, id, &ProgressStep::failed(error)).await?;
        }
        self.commit(tx).await?;
        count_end(&ended);
        Ok(true)
    }

    async fn note_retry(&self, id: Uuid, error: &str) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "update jobs set attempts = attempts + 1, last_error = $2 where id = $1 and state = 'running'",
        )
        .bind(id)
        .bind(error)
        .execute(&mut *tx.tx)
        .await?;
        self.commit(tx).await
    }

    async fn lock_server(&self, server_id: i64) -> Result<Box<dyn ServerLock>, StoreError> {
        Ok(self.memory_lock(server_id).await)
    }

    async fn server_by_id(&self, server_id: i64) -> Result<Option<ServerRow>, StoreError> {
        crate::reads::lite::server_by_id(self.pool(), server_id).await
    }

    async fn servers_of_user(&self, user_id: i64) -> Result<Vec<ServerRow>, StoreError> {
        self.servers_of(&[user_id]).await
    }

    async fn mark_running(&self, r: &Running) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let done = sqlx::query(
            "update servers set state = 'running', container_id = $3, url = $4, token_hash = $5, \
             started_at = $8, last_activity = $8, error = null, warning = null, warned_at = null, \
             mem_limit = $6, cpu_limit = $7, updated_at = $8 \
             where id = $1 and spawn_job_id = $2 and state = 'pending_spawn'",
        )
        .bind(r.server_id)
        .bind(r.job_id)
        .bind(&r.container_id)
        .bind(&r.url)
        .bind(&r.token_hash)
        .bind(r.mem_limit)
        .bind(r.cpu_limit)
        .bind(now())
        .execute(&mut *tx.tx)
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
            Self::insert_progress(&mut tx, r.job_id, &ready).await?;
        }
        self.commit(tx).await?;
        Ok(done)
    }

    async fn mark_spawn_failed(
        &self,
        server_id: i64,
        job_id: Uuid,
        error: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let done = sqlx::query(
            "update servers set state = 'failed', error = $3, url = null, container_id = null, \
             stopped_at = $4, updated_at = $4 \
             where id = $1 and spawn_job_id = $2 and state = 'pending_spawn'",
        )
        .bind(server_id)
        .bind(job_id)
        .bind(error)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        let done = done.rows_affected() == 1;
        if done {
            end_job(&mut tx, job_id, "failed", Some(error)).await?;
            release_admission(&mut tx, server_id).await?;
            Self::insert_progress(&mut tx, job_id, &ProgressStep::failed(error)).await?;
        }
        self.commit(tx).await?;
        Ok(done)
    }

    async fn mark_stopped(
        &self,
        server_id: i64,
        stop_job: Option<Uuid>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let done = sqlx::query(
            "update servers set state = 'stopped', url = null, container_id = null, \
             token_hash = null, stopped_at = $3, updated_at = $3 \
             where id = $1 and state = 'pending_stop' and ($2 is null or stop_job_id = $2)",
        )
        .bind(server_id)
        .bind(stop_job)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        let done = done.rows_affected() == 1;
        if done {
            release_admission(&mut tx, server_id).await?;
        }
        if let (true, Some(job)) = (done, stop_job) {
            end_job(&mut tx, job, "succeeded", None).await?;
        }
        self.commit(tx).await?;
        Ok(done)
    }

    async fn delete_user(&self, user_id: i64, job_id: Uuid) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let done = sqlx::query("delete from users where id = $1 and cleanup_job_id = $2")
            .bind(user_id)
            .bind(job_id)
            .execute(&mut *tx.tx)
            .await?;
        self.commit(tx).await?;
        Ok(done.rows_affected() == 1)
    }
}
