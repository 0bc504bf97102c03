//! The Postgres implementation of `Platform`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{Postgres, pool::PoolConnection};
use uuid::Uuid;

use crate::{
    pg::PgStore,
    pg_locks::{SERVER_LOCK_SPACE, SessionLock, lock_key},
    platform::{
        LimitChange, LimitOverrides, Platform, SlotAnswer, SpawnSlot, Usage, WorkerInfo, WorkerRow,
    },
    rows::ServerRow,
    store::{ServerLock, StoreError},
};

/// Advisory-lock spaces (the first key of two-key locks).
pub const SLOT_SPACE: i32 = 0x4253_5054; // "BSPT"
const RECONCILE_SPACE: i32 = 0x4252_4543; // "BREC"

/// A waiting delivery renews its claim on every try (at least every 500 ms); one
/// not renewed for this long belonged to a delivery that is gone.
const CLAIM_FRESH: &str = "5 seconds";

/// NOTIFY channel on which a freed spawn slot is announced.
pub const SLOT_FREED_CHANNEL: &str = "berth_slot_freed";

#[async_trait]
impl Platform for PgStore {
    async fn limit_overrides(&self) -> Result<LimitOverrides, StoreError> {
        crate::reads::pg::limit_overrides(self.pool()).await
    }

    async fn set_limits(
        &self,
        spawn: LimitChange,
        active: LimitChange,
        by: &str,
    ) -> Result<LimitOverrides, StoreError> {
        let (set_spawn, spawn) = spawn.parts();
        let (set_active, active) = active.parts();
        Ok(sqlx::query_as::<_, LimitOverrides>(
            "insert into platform_limits (id) values (true) on conflict (id) do update set \
               concurrent_spawn_limit = case when $1 then $2 else platform_limits.concurrent_spawn_limit end, \
               active_server_limit = case when $3 then $4 else platform_limits.active_server_limit end, \
               updated_at = now(), updated_by = $5 \
             returning concurrent_spawn_limit, active_server_limit, updated_at, updated_by",
        )
        .bind(set_spawn)
        .bind(spawn)
        .bind(set_active)
        .bind(active)
        .bind(by)
        .fetch_one(self.pool())
        .await?)
    }

    async fn usage(&self) -> Result<Usage, StoreError> {
        let (spawns_in_flight, active_servers, waiting_spawns): (i64, i64, i64) = sqlx::query_as(
            "select \
               (select count(*) from pg_locks where locktype = 'advisory' and granted \
                  and classid::bigint = $1 and objsubid = 2 \
                  and database = (select oid from pg_database where datname = current_database())), \
               (select count(*) from admission_tokens where server_id is not null), \
               (select count(*) from jobs where kind = 'spawn' and state = 'queued')",
        )
        .bind(i64::from(SLOT_SPACE))
        .fetch_one(self.pool())
        .await?;
        Ok(Usage {
            spawns_in_flight,
            active_servers,
            waiting_spawns,
        })
    }

    async fn ensure_admission_places(&self, limit: u32) -> Result<(), StoreError> {
        sqlx::query("insert into admission_tokens (slot) select generate_series(0, $1 - 1) on conflict do nothing")
            .bind(limit as i32)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn mark_fetched(&self, job_id: Uuid) -> Result<(), StoreError> {
        // An unowned claim: any delivery may take it over, and until then the
        // slot order counts the job as waiting.
        sqlx::query(
            "update jobs set claimed_by = null, claimed_at = now() where id = $1 and state = 'queued' \
             and (claimed_by is null or claimed_at < now() - $2::interval)",
        )
        .bind(job_id)
        .bind(CLAIM_FRESH)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn try_spawn_slot(
        &self,
        job_id: Uuid,
        created_at: DateTime<Utc>,
        limit: u32,
        worker: &str,
        delivery: Uuid,
    ) -> Result<SlotAnswer, StoreError> {
        let mut conn = self.pool().acquire().await?;
        // Claim the job for this delivery, or renew the claim; a live claim of
        // another delivery (renewed within CLAIM_FRESH) makes this one a duplicate.
        let claimed = sqlx::query(
            "update jobs set claimed_by = $2, claimed_at = now() where id = $1 \
             and state in ('queued', 'running') \
             and (claimed_by is null or claimed_by = $2 or claimed_at < now() - $3::interval)",
        )
        .bind(job_id)
        .bind(delivery)
        .bind(CLAIM_FRESH)
        .execute(&mut *conn)
        .await?;
        if claimed.rows_affected() == 0 {
            let queued: bool = sqlx::query_scalar(
                "select exists (select 1 from jobs where id = $1 and state = 'queued')",
            )
            .bind(job_id)
            .fetch_one(&mut *conn)
            .await?;
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
        // ones back. The slot locks keep the limit exact; this only orders who
        // gets one.
        let (older, held): (i64, i64) = sqlx::query_as(
            "select \
               (select count(*) from jobs j left join apalis.jobs a \
                  on a.job_type = $5 and a.idempotency_key = j.id::text \
                  where j.kind = 'spawn' and j.state = 'queued' and (j.created_at, j.id) < ($2, $1) \
                  and (a.status in ('Queued', 'Running') or j.claimed_at > now() - $6::interval)), \
               (select count(*) from pg_locks where locktype = 'advisory' and granted \
                  and classid::bigint = $3 and objsubid = 2 and objid::bigint < $4 \
                  and database = (select oid from pg_database where datname = current_database()))",
        )
        .bind(job_id)
        .bind(created_at)
        .bind(i64::from(SLOT_SPACE))
        .bind(i64::from(limit))
        .bind(crate::jobs::SPAWN_QUEUE)
        .bind(CLAIM_FRESH)
        .fetch_one(&mut *conn)
        .await?;
        if older >= i64::from(limit) - held {
            return Ok(SlotAnswer::Wait);
        }
        let slot: Option<i32> = sqlx::query_scalar("select berth_try_spawn_slot($1, $2)")
            .bind(SLOT_SPACE)
            .bind(limit as i32)
            .fetch_one(&mut *conn)
            .await?;
        let Some(slot) = slot else {
            return Ok(SlotAnswer::Wait);
        };
        let attempt = sqlx::query_scalar(
            "insert into spawn_attempts (job_id, worker, slot) values ($1, $2, $3) returning id",
        )
        .bind(job_id)
        .bind(worker)
        .bind(slot)
        .fetch_one(&mut *conn)
        .await;
        let attempt: i64 = match attempt {
            Ok(id) => id,
            Err(e) => {
                // Do not keep a slot we cannot account for.
                conn.close_on_drop();
                return Err(e.into());
            }
        };
        Ok(SlotAnswer::Granted(Box::new(PgSpawnSlot {
            conn: Some(conn),
            slot,
            attempt,
        })))
    }

    async fn within_active_limit(&self, server_id: i64, limit: u32) -> Result<bool, StoreError> {
        crate::reads::pg::within_active_limit(self.pool(), server_id, limit).await
    }

    async fn register_worker(&self, w: &WorkerInfo) -> Result<(), StoreError> {
        sqlx::query(
            "insert into workers (name, host, pid, backend, version) values ($1, $2, $3, $4, $5) \
             on conflict (name) do update set host = $2, pid = $3, backend = $4, version = $5, \
             started_at = now(), last_seen = now(), jobs_in_flight = 0, stopped_at = null",
        )
        .bind(&w.name)
        .bind(&w.host)
        .bind(w.pid)
        .bind(&w.backend)
        .bind(&w.version)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn worker_heartbeat(&self, name: &str, jobs_in_flight: i32) -> Result<(), StoreError> {
        sqlx::query("update workers set last_seen = now(), jobs_in_flight = $2 where name = $1")
            .bind(name)
            .bind(jobs_in_flight)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn worker_stopped(&self, name: &str) -> Result<(), StoreError> {
        // On a connection of its own: at shutdown the queue consumer's futures are
        // dropped, and one was seen to hand a pooled connection back inside an open
        // transaction ("there is already a transaction in progress"), so an update
        // made through the pool then was never committed.
        use sqlx::Connection;
        let options = self.pool().connect_options();
        let mut conn = sqlx::PgConnection::connect_with(&options).await?;
        sqlx::query("update workers set stopped_at = now(), last_seen = now(), jobs_in_flight = 0 where name = $1")
            .bind(name)
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        Ok(())
    }

    async fn list_workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        crate::reads::pg::list_workers(self.pool()).await
    }

    async fn try_reconcile_lock(&self) -> Result<Option<Box<dyn ServerLock>>, StoreError> {
        SessionLock::try_take(self.pool(), RECONCILE_SPACE, 0).await
    }

    async fn try_lock_server(
        &self,
        server_id: i64,
    ) -> Result<Option<Box<dyn ServerLock>>, StoreError> {
        SessionLock::try_take(self.pool(), SERVER_LOCK_SPACE, lock_key(server_id)).await
    }

    async fn live_servers(&self) -> Result<Vec<ServerRow>, StoreError> {
        crate::reads::pg::live_servers(self.pool()).await
    }

    async fn mark_lost(
        &self,
        server_id: i64,
        failed: bool,
        error: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin().await?;
        let done = sqlx::query(
            "update servers set state = $2, error = $3, url = null, container_id = null, token_hash = null, \
             stopped_at = now(), updated_at = now() where id = $1 and state = 'running'",
        )
        .bind(server_id)
        .bind(if failed { "failed" } else { "stopped" })
        .bind(error)
        .execute(&mut *tx)
        .await?;
        let done = done.rows_affected() == 1;
        if done {
            crate::pg::release_admission(&mut tx, server_id).await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    async fn close_stale_attempts(&self) -> Result<u64, StoreError> {
        // An open record whose slot lock nobody holds belonged to a worker that died.
        let done = sqlx::query(
            "update spawn_attempts a set ended_at = coalesce(w.last_seen, now()) \
             from spawn_attempts x left join workers w on w.name = x.worker \
             where a.id = x.id and a.ended_at is null and not exists ( \
               select 1 from pg_locks l where l.locktype = 'advisory' and l.granted \
               and l.classid::bigint = $1 and l.objsubid = 2 and l.objid::bigint = a.slot \
               and l.database = (select oid from pg_database where datname = current_database()))",
        )
        .bind(i64::from(SLOT_SPACE))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }
}

struct PgSpawnSlot {
    conn: Option<PoolConnection<Postgres>>,
    slot: i32,
    attempt: i64,
}

#[async_trait]
impl SpawnSlot for PgSpawnSlot {
    fn slot(&self) -> i32 {
        self.slot
    }

    async fn release(mut self: Box<Self>) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let ended =
            sqlx::query("update spawn_attempts set ended_at = clock_timestamp() where id = $1")
                .bind(self.attempt)
                .execute(&mut *conn)
                .await;
        let unlocked = sqlx::query("select pg_advisory_unlock($1, $2)")
            .bind(SLOT_SPACE)
            .bind(self.slot)
            .execute(&mut *conn)
            .await;
        if ended.is_err() || unlocked.is_err() {
            conn.close_on_drop();
            return;
        }
        // After the unlock, so that a woken waiter finds the slot free.
        let _ = sqlx::query("select pg_notify($1, '')")
            .bind(SLOT_FREED_CHANNEL)
            .execute(&mut *conn)
            .await;
    }
}

impl Drop for PgSpawnSlot {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}
