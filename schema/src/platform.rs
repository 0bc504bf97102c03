//! Platform-wide limits, spawn slots, the worker registry and reconciliation.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::{
    db::{Conn, Db, Dialect, apply, each, execute, now},
    pg_locks::{RECONCILE_SPACE, SERVER_LOCK_SPACE, SLOT_SPACE, SessionLock, lock_key},
    rows::{ServerRow, ServerState},
    servers::{provision_admission, release_admission},
    store::{ServerLock, StoreError},
};

/// A waiting delivery renews its claim on every try (at least every 2 s); one
/// not renewed for this long belonged to a delivery that is gone.
const CLAIM_FRESH: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

/// The embedded store's reconciler lock: no server has id 0.
const RECONCILER: i64 = 0;

/// The limits in force: the configured ones unless an admin overrode them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Limits {
    pub concurrent_spawn_limit: u32,
    pub active_server_limit: u32,
}

impl Default for Limits {
    /// The brief's defaults: ten spawns in flight, fifty active servers.
    fn default() -> Self {
        Self {
            concurrent_spawn_limit: 10,
            active_server_limit: 50,
        }
    }
}

/// What an admin set at runtime; `None` falls back to the configuration.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct LimitOverrides {
    pub concurrent_spawn_limit: Option<i32>,
    pub active_server_limit: Option<i32>,
    pub updated_at: Option<DateTime<Utc>>,
    pub updated_by: Option<String>,
}

impl LimitOverrides {
    pub fn apply(&self, configured: Limits) -> Limits {
        Limits {
            concurrent_spawn_limit: self
                .concurrent_spawn_limit
                .map_or(configured.concurrent_spawn_limit, |v| v as u32),
            active_server_limit: self
                .active_server_limit
                .map_or(configured.active_server_limit, |v| v as u32),
        }
    }
}

/// A change of one limit: keep it, set it, or reset it to the configuration.
#[derive(Debug, Clone, Copy, Default)]
pub enum LimitChange {
    #[default]
    Keep,
    Set(i32),
    Reset,
}

impl LimitChange {
    /// As the stores bind it: whether to write the column, and its new value.
    pub fn parts(self) -> (bool, Option<i32>) {
        match self {
            LimitChange::Keep => (false, None),
            LimitChange::Set(v) => (true, Some(v)),
            LimitChange::Reset => (true, None),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct Usage {
    pub spawns_in_flight: i64,
    pub active_servers: i64,
    pub waiting_spawns: i64,
}

#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub name: String,
    pub host: String,
    pub pid: i32,
    pub backend: String,
    pub version: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkerRow {
    pub name: String,
    pub host: String,
    pub pid: i32,
    pub backend: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub jobs_in_flight: i32,
    pub stopped_at: Option<DateTime<Utc>>,
}

/// What a spawn waiting for a slot is told.
pub enum SlotAnswer {
    Granted(Box<dyn SpawnSlot>),
    /// Not yet: older spawns wait, or every slot is taken.
    Wait,
    /// Another delivery of this job holds a live claim on it.
    Duplicate,
}

/// A held spawn slot (a session advisory lock). Releasing records the end of the
/// spawn; a worker that dies frees the slot with its connection.
#[async_trait]
pub trait SpawnSlot: Send {
    fn slot(&self) -> i32;
    async fn release(self: Box<Self>);
}

#[async_trait]
pub trait Platform: Send + Sync + 'static {
    async fn limit_overrides(&self) -> Result<LimitOverrides, StoreError>;
    /// The limits in force: the configured ones unless an admin overrode them.
    async fn limits(&self) -> Result<Limits, StoreError>;
    async fn set_limits(
        &self,
        spawn: LimitChange,
        active: LimitChange,
        by: &str,
    ) -> Result<LimitOverrides, StoreError>;
    async fn usage(&self) -> Result<Usage, StoreError>;
    /// Creates the admission places below `limit` ahead of time, so that a burst of
    /// first requests does not queue on creating them.
    async fn ensure_admission_places(&self, limit: u32) -> Result<(), StoreError>;

    /// Takes a slot if one is free and no older spawn is waiting for it, on behalf
    /// of one delivery of the job (`delivery`), whose claim on the job it renews.
    async fn try_spawn_slot(
        &self,
        job_id: Uuid,
        created_at: DateTime<Utc>,
        limit: u32,
        worker: &str,
        delivery: Uuid,
    ) -> Result<SlotAnswer, StoreError>;
    /// A worker has just fetched this queued spawn: it counts as waiting for a slot
    /// (older than spawns fetched after it) until its delivery claims it.
    async fn mark_fetched(&self, job_id: Uuid) -> Result<(), StoreError>;
    /// The worker's authoritative check: is this server within the active-server
    /// limit, counting only servers admitted before it?
    async fn within_active_limit(&self, server_id: i64, limit: u32) -> Result<bool, StoreError>;

    async fn register_worker(&self, worker: &WorkerInfo) -> Result<(), StoreError>;
    async fn worker_heartbeat(&self, name: &str, jobs_in_flight: i32) -> Result<(), StoreError>;
    async fn worker_stopped(&self, name: &str) -> Result<(), StoreError>;
    async fn list_workers(&self) -> Result<Vec<WorkerRow>, StoreError>;

    /// One reconciler at a time, platform-wide; `None` while another runs.
    async fn try_reconcile_lock(&self) -> Result<Option<Box<dyn ServerLock>>, StoreError>;
    /// The server's lock if nobody holds it now.
    async fn try_lock_server(
        &self,
        server_id: i64,
    ) -> Result<Option<Box<dyn ServerLock>>, StoreError>;
    /// Servers that should have a container: pending spawn, running, pending stop.
    async fn live_servers(&self) -> Result<Vec<ServerRow>, StoreError>;
    /// `running → stopped` (or `failed` with `error`) when its container is gone.
    async fn mark_lost(
        &self,
        server_id: i64,
        failed: bool,
        error: &str,
    ) -> Result<bool, StoreError>;
    /// Closes slot records left open by workers that died.
    async fn close_stale_attempts(&self) -> Result<u64, StoreError>;
}

/// Records that `worker` took `slot` for the job.
async fn record_attempt(
    c: Conn<'_>,
    job_id: Uuid,
    worker: &str,
    slot: i32,
) -> Result<i64, StoreError> {
    Ok(each!(c, c => sqlx::query_scalar(
        "insert into spawn_attempts (job_id, worker, slot, started_at) values ($1, $2, $3, $4) \
         returning id",
    )
    .bind(job_id)
    .bind(worker)
    .bind(slot)
    .bind(now())
    .fetch_one(c)
    .await)?)
}

impl Db {
    /// Spawn slots below `below` held right now, platform-wide.
    async fn held_slots(&self, below: u32) -> Result<i64, StoreError> {
        Ok(match self.on() {
            Dialect::Pg(s) => crate::pg_locks::held_slots(s.pool(), i64::from(below)).await?,
            Dialect::Lite(s) => s
                .held_slots()
                .iter()
                .filter(|k| i64::from(**k) < i64::from(below))
                .count() as i64,
        })
    }

    async fn try_lock(
        &self,
        space: i32,
        key: i64,
    ) -> Result<Option<Box<dyn ServerLock>>, StoreError> {
        match self.on() {
            Dialect::Pg(s) => SessionLock::try_take(s.pool(), space, lock_key(key)).await,
            Dialect::Lite(s) => Ok(s.try_memory_lock(key)),
        }
    }
}

#[async_trait]
impl Platform for Db {
    async fn limit_overrides(&self) -> Result<LimitOverrides, StoreError> {
        Ok(each!(self.pool(), p => sqlx::query_as::<_, LimitOverrides>(
            "select concurrent_spawn_limit, active_server_limit, updated_at, updated_by \
             from platform_limits",
        )
        .fetch_optional(p)
        .await)?
        .unwrap_or_default())
    }

    async fn limits(&self) -> Result<Limits, StoreError> {
        Ok(self
            .limit_overrides()
            .await?
            .apply(self.configured_limits()))
    }

    async fn set_limits(
        &self,
        spawn: LimitChange,
        active: LimitChange,
        by: &str,
    ) -> Result<LimitOverrides, StoreError> {
        let (set_spawn, spawn) = spawn.parts();
        let (set_active, active) = active.parts();
        self.write(async |tx| {
            // The one row exists on SQLite from its migration; on Postgres the
            // first change creates it.
            Ok(each!(tx.conn(), c => sqlx::query_as::<_, LimitOverrides>(
                "insert into platform_limits (id) values (true) on conflict (id) do update set \
                   concurrent_spawn_limit = case when $1 then $2 else platform_limits.concurrent_spawn_limit end, \
                   active_server_limit = case when $3 then $4 else platform_limits.active_server_limit end, \
                   updated_at = $6, updated_by = $5 \
                 returning concurrent_spawn_limit, active_server_limit, updated_at, updated_by",
            )
            .bind(set_spawn)
            .bind(spawn)
            .bind(set_active)
            .bind(active)
            .bind(by)
            .bind(now())
            .fetch_one(c)
            .await)?)
        })
        .await
    }

    async fn usage(&self) -> Result<Usage, StoreError> {
        let (active_servers, waiting_spawns): (i64, i64) = each!(self.pool(), p => sqlx::query_as(
            "select (select count(*) from admission_tokens where server_id is not null), \
               (select count(*) from jobs where kind = 'spawn' and state = 'queued')",
        )
        .fetch_one(p)
        .await)?;
        Ok(Usage {
            spawns_in_flight: self.held_slots(u32::MAX).await?,
            active_servers,
            waiting_spawns,
        })
    }

    async fn ensure_admission_places(&self, limit: u32) -> Result<(), StoreError> {
        self.write(async |tx| provision_admission(tx, limit as i32).await)
            .await
    }

    async fn mark_fetched(&self, job_id: Uuid) -> Result<(), StoreError> {
        // An unowned claim: any delivery may take it over, and until then the
        // slot order counts the job as waiting.
        let at = now();
        apply!(
            self,
            "update jobs set claimed_by = null, claimed_at = $2 where id = $1 and state = 'queued' \
                 and (claimed_by is null or claimed_at < $3)",
            job_id,
            at,
            at - CLAIM_FRESH
        )
        .map(drop)
    }

    async fn try_spawn_slot(
        &self,
        job_id: Uuid,
        created_at: DateTime<Utc>,
        limit: u32,
        worker: &str,
        delivery: Uuid,
    ) -> Result<SlotAnswer, StoreError> {
        let at = now();
        let mut tx = self.begin().await?;
        // Claim the job for this delivery, or renew the claim; a live claim of
        // another delivery (renewed within CLAIM_FRESH) makes this one a duplicate.
        let claimed = execute!(
            tx.conn(),
            "update jobs set claimed_by = $2, claimed_at = $3 where id = $1 \
             and state in ('queued', 'running') \
             and (claimed_by is null or claimed_by = $2 or claimed_at < $4)",
            job_id,
            delivery,
            at,
            at - CLAIM_FRESH
        )?;
        if claimed == 0 {
            let queued: bool = each!(tx.conn(), c => sqlx::query_scalar(
                "select exists (select 1 from jobs where id = $1 and state = 'queued')",
            )
            .bind(job_id)
            .fetch_one(c)
            .await)?;
            tx.commit().await?;
            // Not queued any more: the caller's next look at the server tells why.
            return Ok(if queued {
                SlotAnswer::Duplicate
            } else {
                SlotAnswer::Wait
            });
        }
        // Is it this job's turn: fewer older waiting spawns than free slots? A
        // waiter is a queued spawn that a delivery is waiting with (a fresh claim)
        // or that a worker has just fetched (its queue task is taken, its first
        // claim may not be made yet); a job still in the queue never holds younger
        // ones back. The slots keep the limit exact; this only orders who gets one.
        let older: i64 = match tx.conn() {
            Dialect::Pg(c) => {
                sqlx::query_scalar(
                    "select count(*) from jobs j left join apalis.jobs a \
                   on a.job_type = $3 and a.idempotency_key = j.id::text \
                 where j.kind = 'spawn' and j.state = 'queued' and (j.created_at, j.id) < ($2, $1) \
                 and (a.status in ('Queued', 'Running') or j.claimed_at > $4)",
                )
                .bind(job_id)
                .bind(created_at)
                .bind(crate::jobs::SPAWN_QUEUE)
                .bind(at - CLAIM_FRESH)
                .fetch_one(c)
                .await?
            }
            Dialect::Lite(c) => {
                sqlx::query_scalar(
                    "select count(*) from jobs j left join queue q on q.job_id = j.id \
                 where j.kind = 'spawn' and j.state = 'queued' \
                 and (j.created_at < $2 or (j.created_at = $2 and j.id < $1)) \
                 and (q.taken_by is not null or j.claimed_at > $3)",
                )
                .bind(job_id)
                .bind(created_at)
                .bind(at - CLAIM_FRESH)
                .fetch_one(c)
                .await?
            }
        };
        // As many older waiters as slots: not its turn whatever is held, and the
        // count of held slots (pg_locks, the costliest of these statements) is not
        // asked; in a storm most waiters are that far back.
        if older >= i64::from(limit) || older >= i64::from(limit) - self.held_slots(limit).await? {
            tx.commit().await?;
            return Ok(SlotAnswer::Wait);
        }
        let slot = match self.on() {
            Dialect::Pg(s) => {
                tx.commit().await?;
                crate::pg_locks::take_slot(s.pool(), limit, async |c, slot| {
                    record_attempt(Dialect::Pg(c), job_id, worker, slot).await
                })
                .await?
            }
            // Taken and recorded in one writers' turn, which is what
            // `close_stale_attempts` reads under.
            Dialect::Lite(s) => match s.take_memory_slot(limit) {
                None => {
                    tx.commit().await?;
                    None
                }
                Some(slot) => {
                    let recorded = match record_attempt(tx.conn(), job_id, worker, slot).await {
                        Ok(attempt) => tx.commit().await.map(|()| attempt),
                        Err(e) => Err(e),
                    };
                    match recorded {
                        Ok(attempt) => Some(s.spawn_slot(slot, attempt)),
                        Err(e) => {
                            s.free_slot(slot);
                            return Err(e);
                        }
                    }
                }
            },
        };
        Ok(slot.map_or(SlotAnswer::Wait, SlotAnswer::Granted))
    }

    async fn within_active_limit(&self, server_id: i64, limit: u32) -> Result<bool, StoreError> {
        // A place at or above `limit` was granted before an admin lowered the limit.
        let place: Option<i32> = each!(self.pool(), p => sqlx::query_scalar(
            "select slot from admission_tokens where server_id = $1",
        )
        .bind(server_id)
        .fetch_optional(p)
        .await)?;
        Ok(place.is_some_and(|p| i64::from(p) < i64::from(limit)))
    }

    async fn register_worker(&self, w: &WorkerInfo) -> Result<(), StoreError> {
        apply!(
            self,
            "insert into workers (name, host, pid, backend, version, started_at, last_seen) \
                 values ($1, $2, $3, $4, $5, $6, $6) \
                 on conflict (name) do update set host = $2, pid = $3, backend = $4, version = $5, \
                 started_at = $6, last_seen = $6, jobs_in_flight = 0, stopped_at = null",
            &w.name,
            &w.host,
            w.pid,
            &w.backend,
            &w.version,
            now()
        )
        .map(drop)
    }

    async fn worker_heartbeat(&self, name: &str, jobs_in_flight: i32) -> Result<(), StoreError> {
        apply!(
            self,
            "update workers set last_seen = $3, jobs_in_flight = $2 where name = $1",
            name,
            jobs_in_flight,
            now()
        )
        .map(drop)
    }

    async fn worker_stopped(&self, name: &str) -> Result<(), StoreError> {
        const STOPPED: &str = "update workers set stopped_at = $2, last_seen = $2, \
                               jobs_in_flight = 0 where name = $1";
        match self.on() {
            Dialect::Pg(s) => {
                // On a connection of its own: at shutdown the queue consumer's
                // futures are dropped, and one was seen to hand a pooled connection
                // back inside an open transaction ("there is already a transaction
                // in progress"), so an update made through the pool then was never
                // committed.
                use sqlx::Connection;
                let mut conn =
                    sqlx::PgConnection::connect_with(&s.pool().connect_options()).await?;
                sqlx::query(STOPPED)
                    .bind(name)
                    .bind(now())
                    .execute(&mut conn)
                    .await?;
                conn.close().await?;
                Ok(())
            }
            Dialect::Lite(_) => apply!(self, STOPPED, name, now()).map(drop),
        }
    }

    async fn list_workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        Ok(
            each!(self.pool(), p => sqlx::query_as::<_, WorkerRow>("select * from workers order by started_at desc")
            .fetch_all(p)
            .await)?,
        )
    }

    async fn try_reconcile_lock(&self) -> Result<Option<Box<dyn ServerLock>>, StoreError> {
        self.try_lock(RECONCILE_SPACE, RECONCILER).await
    }

    async fn try_lock_server(
        &self,
        server_id: i64,
    ) -> Result<Option<Box<dyn ServerLock>>, StoreError> {
        self.try_lock(SERVER_LOCK_SPACE, server_id).await
    }

    async fn live_servers(&self) -> Result<Vec<ServerRow>, StoreError> {
        Ok(
            each!(self.pool(), p => sqlx::query_as::<_, ServerRow>(select_servers!(
            "where s.state in ('pending_spawn', 'running', 'pending_stop')"
        ))
        .fetch_all(p)
        .await)?,
        )
    }

    async fn mark_lost(
        &self,
        server_id: i64,
        failed: bool,
        error: &str,
    ) -> Result<bool, StoreError> {
        self.write(async |tx| {
            let state = if failed {
                ServerState::Failed
            } else {
                ServerState::Stopped
            };
            let done = execute!(
                tx.conn(),
                "update servers set state = $2, error = $3, url = null, container_id = null, \
                 token_hash = null, proxy_token = null, stopped_at = $4, updated_at = $4 \
                 where id = $1 and state = 'running'",
                server_id,
                state,
                error,
                now()
            )? == 1;
            if done {
                release_admission(tx, server_id).await?;
                tx.route_changed(server_id);
            }
            Ok(done)
        })
        .await
    }

    async fn close_stale_attempts(&self) -> Result<u64, StoreError> {
        // An open record whose slot nobody holds belonged to a worker that died
        // (on SQLite: to the process before a restart); it ended when its worker
        // was last seen.
        let at = now();
        self.write(async |tx| {
            Ok(match (tx.conn(), self.on()) {
                (Dialect::Pg(c), _) => sqlx::query(
                    "update spawn_attempts a set ended_at = coalesce(w.last_seen, $2) \
                     from spawn_attempts x left join workers w on w.name = x.worker \
                     where a.id = x.id and a.ended_at is null and not exists ( \
                       select 1 from pg_locks l where l.locktype = 'advisory' and l.granted \
                       and l.classid::bigint = $1 and l.objsubid = 2 and l.objid::bigint = a.slot \
                       and l.database = (select oid from pg_database where datname = current_database()))",
                )
                .bind(i64::from(SLOT_SPACE))
                .bind(at)
                .execute(c)
                .await?
                .rows_affected(),
                // Read under the writers' turn: a slot is taken and its record
                // written within one turn.
                (Dialect::Lite(c), Dialect::Lite(s)) => sqlx::query(
                    "update spawn_attempts set ended_at = coalesce( \
                       (select w.last_seen from workers w where w.name = spawn_attempts.worker), $2) \
                     where ended_at is null and slot not in (select value from json_each($1))",
                )
                .bind(crate::db::json_list(&s.held_slots()))
                .bind(at)
                .execute(c)
                .await?
                .rows_affected(),
                (Dialect::Lite(_), Dialect::Pg(_)) => unreachable!("a transaction of its own store"),
            })
        })
        .await
    }
}
