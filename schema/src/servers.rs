//! Servers and their jobs: the requests (spawn, stop, a user's removal) and the
//! workers' transitions, written once for both databases.

use async_trait::async_trait;
use uuid::Uuid;

use crate::{
    accounts::Role,
    console::ProgressStep,
    db::{Db, Dialect, Tx, apply, each, execute, json_list, locking, now},
    jobs::{CleanupJob, JobKind, JobOutcome, JobRow, JobState, ServerJob},
    names::{ServerName, UserName},
    profiles::Profile,
    rows::{ServerRow, ServerState, UserRow, UserState},
    store::{Running, ServerLock, SpawnOutcome, SpawnRequest, StopOutcome, Store, StoreError},
    telemetry,
};

/// The columns of a `ServerRow` after `returning`, with the owner's name bound as `$name`.
macro_rules! server_columns {
    ($name:literal) => {
        concat!(
            "returning id, user_id, ",
            $name,
            " as user_name, name, state, image, spawn_job_id, stop_job_id, container_id, url, \
             error, requested_at, started_at, stopped_at, last_activity, warning, profile, \
             profile_spec, idle_timeout_secs, max_age_secs"
        )
    };
}

/// Gives a server's admission places back: the platform's and its profile's.
pub(crate) async fn release_admission(tx: &mut Tx, server_id: i64) -> Result<(), StoreError> {
    execute!(
        tx.conn(),
        "update admission_tokens set server_id = null where server_id = $1",
        server_id
    )?;
    execute!(
        tx.conn(),
        "update profile_places set server_id = null where server_id = $1",
        server_id
    )?;
    Ok(())
}

/// Creates the admission places below `limit` that do not exist yet.
pub(crate) async fn provision_admission(tx: &mut Tx, limit: i32) -> Result<(), StoreError> {
    execute!(
        tx.conn(),
        "with recursive n(slot) as (select 0 union all select slot + 1 from n where slot + 1 < $1) \
         insert into admission_tokens (slot) select slot from n where $1 > 0 \
         on conflict (slot) do nothing",
        limit
    )?;
    Ok(())
}

/// A set of admission places: the platform's (`admission_tokens`) or one
/// profile's (`profile_places`). Both work alike: one row per place, made from 0
/// up on first need and never removed, claimed by a server and given back.
#[derive(Clone, Copy)]
pub(crate) enum Places<'a> {
    Platform,
    Profile(&'a str),
}

impl Places<'_> {
    /// The table, and the condition that picks this set's rows with the profile
    /// bound as parameter `n` (null for the platform's, whose table has no column).
    fn table(self, n: u8) -> (&'static str, String) {
        match self {
            Places::Platform => ("admission_tokens", format!("${n} is null")),
            Places::Profile(_) => ("profile_places", format!("profile = ${n}")),
        }
    }

    fn profile(self) -> Option<String> {
        match self {
            Places::Platform => None,
            Places::Profile(name) => Some(name.to_owned()),
        }
    }
}

/// Claims the lowest free place below `limit` of `places` for the server. On
/// Postgres concurrent claims skip each other's rows instead of queueing; on
/// SQLite writers take turns, so the first free place is free for this one.
pub(crate) async fn claim_place(
    tx: &mut Tx,
    places: Places<'_>,
    server_id: i64,
    limit: i32,
) -> Result<bool, StoreError> {
    let (table, mine) = places.table(2);
    let claim = |lock: &str| {
        sqlx::AssertSqlSafe(format!(
            "update {table} set server_id = $1 where {mine} and slot = ( \
               select slot from {table} where {mine} and server_id is null and slot < $3 \
               order by slot limit 1 {lock}) returning slot"
        ))
    };
    for provisioned in [false, true] {
        let claimed: Option<i32> = match tx.conn() {
            Dialect::Pg(c) => {
                sqlx::query_scalar(claim("for update skip locked"))
                    .bind(server_id)
                    .bind(places.profile())
                    .bind(limit)
                    .fetch_optional(c)
                    .await?
            }
            Dialect::Lite(c) => {
                sqlx::query_scalar(claim(""))
                    .bind(server_id)
                    .bind(places.profile())
                    .bind(limit)
                    .fetch_optional(c)
                    .await?
            }
        };
        if claimed.is_some() {
            return Ok(true);
        }
        if provisioned {
            break;
        }
        // Places are made from 0 up, never removed: the last one tells whether all are.
        let (_, mine) = places.table(2);
        let made: bool = each!(tx.conn(), c => sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select exists (select 1 from {table} where {mine} and slot = $1 - 1)"
        )))
        .bind(limit)
        .bind(places.profile())
        .fetch_one(c)
        .await)?;
        if made {
            break;
        }
        match places {
            Places::Platform => provision_admission(tx, limit).await?,
            Places::Profile(name) => {
                execute!(
                    tx.conn(),
                    "with recursive n(slot) as \
                       (select 0 union all select slot + 1 from n where slot + 1 < $2) \
                     insert into profile_places (profile, slot) select $1, slot from n \
                     where exists (select 1 from profiles where name = $1) \
                     on conflict (profile, slot) do nothing",
                    name,
                    limit
                )?;
            }
        }
    }
    Ok(false)
}

/// How many servers hold a place of `places` now.
pub(crate) async fn places_taken(tx: &mut Tx, places: Places<'_>) -> Result<i64, StoreError> {
    let (table, mine) = places.table(1);
    Ok(
        each!(tx.conn(), c => sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from {table} where {mine} and server_id is not null"
    )))
    .bind(places.profile())
    .fetch_one(c)
    .await)?,
    )
}

/// Ends a job that has not ended yet. The workers' server transitions end their
/// job in the same transaction, so nobody ever sees a running server whose spawn
/// job still runs; the handler's own report afterwards changes nothing.
pub(crate) async fn end_job(
    tx: &mut Tx,
    id: Uuid,
    state: JobState,
    error: Option<&str>,
) -> Result<(), StoreError> {
    let ended = each!(tx.conn(), c => sqlx::query_as::<_, JobRow>(
        "update jobs set state = $2, last_error = coalesce($3, last_error), finished_at = $4 \
         where id = $1 and state in ('queued', 'running') returning *",
    )
    .bind(id)
    .bind(state)
    .bind(error)
    .bind(now())
    .fetch_optional(c)
    .await)?;
    if let Some(job) = ended {
        count_end(&job);
    }
    Ok(())
}

/// Counts a job that has just reached its final state.
pub(crate) fn count_end(job: &JobRow) {
    telemetry::job_ended(
        job.kind,
        job.state,
        job.created_at,
        job.started_at,
        job.finished_at.unwrap_or_else(chrono::Utc::now),
    );
}

impl Db {
    /// A spawn request in a transaction of its own: a request that cannot go with
    /// a batch.
    pub(crate) async fn request_spawn_alone(
        &self,
        req: SpawnRequest,
    ) -> Result<SpawnOutcome, StoreError> {
        let mut tx = self.begin().await?;
        let outcome = self.spawn_in(&mut tx, &req).await?;
        if let SpawnOutcome::Enqueued(_) = outcome {
            tx.commit().await?;
        }
        Ok(outcome)
    }

    /// Decides a spawn request in `tx`; only an `Enqueued` outcome wrote anything
    /// that must stay (an error may leave a new server row: undo it).
    pub(crate) async fn spawn_in(
        &self,
        tx: &mut Tx,
        req: &SpawnRequest,
    ) -> Result<SpawnOutcome, StoreError> {
        let at = now();
        // Locking the user serialises one user's spawn requests, so the per-user
        // count below is exact, and keeps a concurrent delete from slipping in.
        let user: Option<(i64, UserState, i32)> = locking!(
            tx,
            "select u.id, u.state, coalesce((select active_server_limit from platform_limits), $2) \
             from users u where u.name = $1",
            "for update of u",
            |c, sql| sqlx::query_as(sql)
                .bind(req.user.as_str())
                .bind(self.configured_limits().active_server_limit as i32)
                .fetch_optional(c)
                .await
        )?;
        let (user_id, user_state, limit) = user.ok_or_else(|| StoreError::no_user(&req.user))?;
        if user_state == UserState::Deleting {
            return Err(StoreError::user_deleting(&req.user));
        }
        // Creates the row on first use and locks it either way, in one statement.
        let server = each!(tx.conn(), c => sqlx::query_as::<_, ServerRow>(concat!(
            "insert into servers (user_id, name, state, requested_at, created_at, updated_at) \
             values ($1, $2, 'stopped', $4, $4, $4) \
             on conflict (user_id, name) do update set updated_at = servers.updated_at ",
            server_columns!("$3")
        ))
        .bind(user_id)
        .bind(req.server.as_str())
        .bind(req.user.as_str())
        .bind(at)
        .fetch_one(c)
        .await)?;
        match server.state {
            ServerState::PendingSpawn => return Ok(SpawnOutcome::AlreadyPending(server)),
            ServerState::Running => return Ok(SpawnOutcome::AlreadyRunning(server)),
            ServerState::PendingStop => {
                return Err(StoreError::server_stopping());
            }
            ServerState::Stopped | ServerState::Failed => {}
        }
        if let Some(most) = req.max_servers_per_user {
            let live: i64 = each!(tx.conn(), c => sqlx::query_scalar(
                "select count(*) from servers where user_id = $1 \
                 and state in ('pending_spawn', 'running', 'pending_stop')",
            )
            .bind(user_id)
            .fetch_one(c)
            .await)?;
            if live >= i64::from(most) {
                return Err(StoreError::per_user_limit(&req.user, live, most));
            }
        }
        if !claim_place(tx, Places::Platform, server.id, limit).await? {
            let active = places_taken(tx, Places::Platform).await?;
            return Err(StoreError::platform_full(active, limit));
        }
        if let Some(profile) = &req.profile
            && let Some(most) = profile.max_active
            && !claim_place(tx, Places::Profile(&profile.name), server.id, most).await?
        {
            return Err(StoreError::profile_full(&profile.name, most));
        }
        let payload = serde_json::to_value(ServerJob {
            server_id: server.id,
        })
        .expect("payload serialises");
        let job = self
            .insert_job(
                tx,
                JobKind::Spawn,
                req.user.as_str(),
                Some(req.server.as_str()),
                payload,
            )
            .await?;
        let server = each!(tx.conn(), c => sqlx::query_as::<_, ServerRow>(concat!(
            "update servers set state = 'pending_spawn', spawn_job_id = $2, stop_job_id = null, \
             image = $3, error = null, url = null, container_id = null, started_at = null, \
             stopped_at = null, requested_at = $5, updated_at = $5, profile = $6, \
             profile_spec = $7, idle_timeout_secs = $8, max_age_secs = $9 where id = $1 ",
            server_columns!("$4")
        ))
        .bind(server.id)
        .bind(job.id)
        .bind(&req.image)
        .bind(req.user.as_str())
        .bind(at)
        .bind(req.profile.as_ref().map(|p| p.name.as_str()))
        .bind(req.profile.as_ref().map(Profile::to_json))
        .bind(req.profile.as_ref().and_then(|p| p.idle_timeout))
        .bind(req.profile.as_ref().and_then(|p| p.max_age))
        .fetch_one(c)
        .await)?;
        tx.insert_progress(job.id, &ProgressStep::at(0, crate::spawn_batch::REQUESTED))
            .await?;
        tx.route_changed(server.id);
        Ok(SpawnOutcome::Enqueued(server))
    }
}

#[async_trait]
impl Store for Db {
    async fn ping(&self) -> Result<(), StoreError> {
        each!(self.pool(), p => sqlx::query("select 1").execute(p).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    async fn create_user(&self, name: &UserName, admin: bool) -> Result<UserRow, StoreError> {
        let row = self
            .write(async |tx| {
                Ok(each!(tx.conn(), c => sqlx::query_as::<_, UserRow>(
                    "insert into users (name, role, created_at) values ($1, $2, $3) \
                     on conflict (name) do nothing returning *",
                )
                .bind(name.as_str())
                .bind(if admin { Role::Admin } else { Role::User })
                .bind(now())
                .fetch_optional(c)
                .await)?)
            })
            .await?;
        row.ok_or_else(|| StoreError::Conflict(format!("user {name:?} already exists")))
    }

    async fn get_user(&self, name: &UserName) -> Result<Option<UserRow>, StoreError> {
        Ok(
            each!(self.pool(), p => sqlx::query_as::<_, UserRow>("select * from users where name = $1")
            .bind(name.as_str())
            .fetch_optional(p)
            .await)?,
        )
    }

    async fn list_users(&self) -> Result<Vec<UserRow>, StoreError> {
        Ok(
            each!(self.pool(), p => sqlx::query_as::<_, UserRow>("select * from users order by name")
            .fetch_all(p)
            .await)?,
        )
    }

    async fn servers_of(&self, user_ids: &[i64]) -> Result<Vec<ServerRow>, StoreError> {
        Ok(match self.pool() {
            Dialect::Pg(p) => {
                sqlx::query_as::<_, ServerRow>(select_servers!(
                    "where s.user_id = any($1) order by s.user_id, s.name"
                ))
                .bind(user_ids)
                .fetch_all(p)
                .await?
            }
            Dialect::Lite(p) => sqlx::query_as::<_, ServerRow>(select_servers!(
                "where s.user_id in (select value from json_each($1)) order by s.user_id, s.name"
            ))
            .bind(json_list(user_ids))
            .fetch_all(p)
            .await?,
        })
    }

    async fn get_server(
        &self,
        user: &UserName,
        server: &ServerName,
    ) -> Result<Option<ServerRow>, StoreError> {
        Ok(
            each!(self.pool(), p => sqlx::query_as::<_, ServerRow>(select_servers!(
            "where u.name = $1 and s.name = $2"
        ))
        .bind(user.as_str())
        .bind(server.as_str())
        .fetch_optional(p)
        .await)?,
        )
    }

    /// On Postgres concurrent requests are decided together (`spawn_batch`).
    async fn request_spawn(&self, req: SpawnRequest) -> Result<SpawnOutcome, StoreError> {
        match self.spawn_batcher() {
            Some(batcher) => batcher.request(self, req).await,
            None => self.request_spawn_alone(req).await,
        }
    }

    async fn request_stop(
        &self,
        user: &UserName,
        server: &ServerName,
    ) -> Result<StopOutcome, StoreError> {
        let mut tx = self.begin().await?;
        let row: Option<ServerRow> = locking!(
            tx,
            select_servers!("where u.name = $1 and s.name = $2"),
            "for update of s",
            |c, sql| sqlx::query_as(sql)
                .bind(user.as_str())
                .bind(server.as_str())
                .fetch_optional(c)
                .await
        )?;
        let row = row.ok_or_else(|| {
            StoreError::NotFound(format!("user {user:?} has no server {server:?}"))
        })?;
        match row.state {
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
        let row = each!(tx.conn(), c => sqlx::query_as::<_, ServerRow>(concat!(
            "update servers set state = 'pending_stop', stop_job_id = $2, updated_at = $3 \
             where id = $1 ",
            server_columns!("$4")
        ))
        .bind(row.id)
        .bind(job.id)
        .bind(now())
        .bind(user.as_str())
        .fetch_one(c)
        .await)?;
        tx.route_changed(row.id);
        tx.commit().await?;
        Ok(StopOutcome::Enqueued(row))
    }

    async fn request_user_removal(&self, user: &UserName) -> Result<JobRow, StoreError> {
        let mut tx = self.begin().await?;
        let row: Option<UserRow> = locking!(
            tx,
            "select * from users where name = $1",
            "for update",
            |c, sql| sqlx::query_as(sql)
                .bind(user.as_str())
                .fetch_optional(c)
                .await
        )?;
        let row = row.ok_or_else(|| StoreError::no_user(user))?;
        if let (Some(id), UserState::Deleting) = (row.cleanup_job_id, row.state) {
            let job = each!(tx.conn(), c => sqlx::query_as::<_, JobRow>("select * from jobs where id = $1")
                .bind(id)
                .fetch_optional(c)
                .await)?;
            // A removal still under way is the answer; one that failed (or was
            // archived) is requested anew below.
            if let Some(job) = job.filter(|j| j.state.is_open()) {
                return Ok(job);
            }
        }
        let payload = serde_json::to_value(CleanupJob { user_id: row.id }).expect("serialises");
        let job = self
            .insert_job(&mut tx, JobKind::Cleanup, user.as_str(), None, payload)
            .await?;
        execute!(
            tx.conn(),
            "update users set state = 'deleting', cleanup_job_id = $2 where id = $1",
            row.id,
            job.id
        )?;
        // Stop wins over any spawn in flight: it sees the state change and gives up.
        let stopping: Vec<i64> = each!(tx.conn(), c => sqlx::query_scalar(
            "update servers set state = 'pending_stop', updated_at = $2 \
             where user_id = $1 and state in ('pending_spawn', 'running') returning id",
        )
        .bind(row.id)
        .bind(now())
        .fetch_all(c)
        .await)?;
        for server in stopping {
            tx.route_changed(server);
        }
        tx.commit().await?;
        Ok(job)
    }

    async fn get_job(&self, id: Uuid) -> Result<Option<JobRow>, StoreError> {
        Ok(
            each!(self.pool(), p => sqlx::query_as::<_, JobRow>("select * from jobs where id = $1")
            .bind(id)
            .fetch_optional(p)
            .await)?,
        )
    }

    async fn begin_job(&self, id: Uuid, worker: &str) -> Result<Option<JobRow>, StoreError> {
        let job = self
            .write(async |tx| {
                Ok(each!(tx.conn(), c => sqlx::query_as::<_, JobRow>(
                    "update jobs set state = 'running', attempts = attempts + 1, worker = $2, \
                     started_at = coalesce(started_at, $3) \
                     where id = $1 and state in ('queued', 'running') returning *",
                )
                .bind(id)
                .bind(worker)
                .bind(now())
                .fetch_optional(c)
                .await)?)
            })
            .await?;
        if let Some(job) = job.as_ref().filter(|j| j.attempts == 1) {
            telemetry::job_started(job.kind);
        }
        Ok(job)
    }

    async fn finish_job(&self, id: Uuid, outcome: &JobOutcome) -> Result<(), StoreError> {
        let (state, error) = match outcome {
            JobOutcome::Succeeded => (JobState::Succeeded, None),
            JobOutcome::Cancelled(why) => (JobState::Cancelled, Some(why.as_str())),
            JobOutcome::Failed(why) => (JobState::Failed, Some(why.as_str())),
        };
        self.write(async |tx| end_job(tx, id, state, error).await)
            .await
    }

    async fn dead_letter(&self, id: Uuid, error: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let at = now();
        let ended = each!(tx.conn(), c => sqlx::query_as::<_, JobRow>(
            "update jobs set state = 'failed', last_error = $2, finished_at = $3 \
             where id = $1 and state in ('queued', 'running') returning *",
        )
        .bind(id)
        .bind(error)
        .bind(at)
        .fetch_optional(c)
        .await)?;
        let Some(ended) = ended else {
            return Ok(false);
        };
        // The server this job was to move on is stuck without it: it fails, keeping
        // the error, and the reconciler removes any container it has left.
        let servers: Vec<i64> = each!(tx.conn(), c => sqlx::query_scalar(
            "update servers set state = 'failed', error = $2, updated_at = $3, \
             stopped_at = $3, url = null \
             where (spawn_job_id = $1 and state = 'pending_spawn') \
                or (stop_job_id = $1 and state = 'pending_stop') \
             returning id",
        )
        .bind(id)
        .bind(error)
        .bind(at)
        .fetch_all(c)
        .await)?;
        for server in servers {
            release_admission(&mut tx, server).await?;
            tx.route_changed(server);
        }
        if ended.kind == JobKind::Spawn {
            tx.insert_progress(id, &ProgressStep::failed(error)).await?;
        }
        tx.commit().await?;
        count_end(&ended);
        Ok(true)
    }

    async fn note_retry(&self, id: Uuid, error: &str) -> Result<(), StoreError> {
        apply!(
            self,
            "update jobs set attempts = attempts + 1, last_error = $2 \
                 where id = $1 and state = 'running'",
            id,
            error
        )
        .map(drop)
    }

    async fn lock_server(&self, server_id: i64) -> Result<Box<dyn ServerLock>, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.lock_server(server_id).await,
            Dialect::Lite(s) => Ok(s.memory_lock(server_id).await),
        }
    }

    async fn server_by_id(&self, server_id: i64) -> Result<Option<ServerRow>, StoreError> {
        Ok(
            each!(self.pool(), p => sqlx::query_as::<_, ServerRow>(select_servers!("where s.id = $1"))
            .bind(server_id)
            .fetch_optional(p)
            .await)?,
        )
    }

    async fn servers_of_user(&self, user_id: i64) -> Result<Vec<ServerRow>, StoreError> {
        self.servers_of(&[user_id]).await
    }

    async fn mark_running(&self, r: &Running) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let done = execute!(
            tx.conn(),
            "update servers set state = 'running', container_id = $3, url = $4, token_hash = $5, \
             started_at = $8, last_activity = $8, error = null, warning = null, warned_at = null, \
             mem_limit = $6, cpu_limit = $7, updated_at = $8, proxy_token = $9, spawner = $10 \
             where id = $1 and spawn_job_id = $2 and state = 'pending_spawn'",
            r.server_id,
            r.job_id,
            &r.container_id,
            &r.url,
            &r.token_hash,
            r.mem_limit,
            r.cpu_limit,
            now(),
            &r.proxy_token,
            &r.spawner
        )?;
        let done = done == 1;
        if done {
            tx.route_changed(r.server_id);
            end_job(&mut tx, r.job_id, JobState::Succeeded, None).await?;
            // The stream adds the address users reach it at; the internal one is not theirs.
            let ready = ProgressStep {
                progress: 100,
                message: "server ready".into(),
                ready: true,
                ..Default::default()
            };
            tx.insert_progress(r.job_id, &ready).await?;
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
        let mut tx = self.begin().await?;
        let done = execute!(
            tx.conn(),
            "update servers set state = 'failed', error = $3, url = null, container_id = null, \
             stopped_at = $4, updated_at = $4 \
             where id = $1 and spawn_job_id = $2 and state = 'pending_spawn'",
            server_id,
            job_id,
            error,
            now()
        )?;
        let done = done == 1;
        if done {
            end_job(&mut tx, job_id, JobState::Failed, Some(error)).await?;
            release_admission(&mut tx, server_id).await?;
            tx.route_changed(server_id);
            tx.insert_progress(job_id, &ProgressStep::failed(error))
                .await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    async fn mark_stopped(
        &self,
        server_id: i64,
        stop_job: Option<Uuid>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let done = execute!(
            tx.conn(),
            "update servers set state = 'stopped', url = null, container_id = null, \
             token_hash = null, proxy_token = null, stopped_at = $3, updated_at = $3 \
             where id = $1 and state = 'pending_stop' and ($2 is null or stop_job_id = $2)",
            server_id,
            stop_job,
            now()
        )?;
        let done = done == 1;
        if done {
            release_admission(&mut tx, server_id).await?;
            tx.route_changed(server_id);
        }
        if let (true, Some(job)) = (done, stop_job) {
            end_job(&mut tx, job, JobState::Succeeded, None).await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    async fn delete_user(&self, user_id: i64, job_id: Uuid) -> Result<bool, StoreError> {
        self.write(async |tx| {
            let done = execute!(
                tx.conn(),
                "delete from users where id = $1 and cleanup_job_id = $2",
                user_id,
                job_id
            )?;
            Ok(done == 1)
        })
        .await
    }
}
