//! `Platform` on SQLite: limits and the worker registry in the file; spawn slots
//! and locks in the memory of the one process that owns it.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Memory, SqliteStore, now, store::provision_admission};
use crate::{
    platform::{
        LimitChange, LimitOverrides, Platform, SlotAnswer, SpawnSlot, Usage, WorkerInfo, WorkerRow,
    },
    rows::ServerRow,
    store::{ServerLock, StoreError},
};

/// As on Postgres: a waiting delivery renews its claim at least every 500 ms.
const CLAIM_FRESH: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

/// The reconciler's lock: no server has id 0.
const RECONCILER: i64 = 0;

struct MemoryLock {
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

#[async_trait]
impl ServerLock for MemoryLock {
    async fn release(self: Box<Self>) {}
}

impl SqliteStore {
    fn lock_of(&self, key: i64) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.memory.locks.lock().expect("locks");
        // Forget locks nobody holds or waits for, so the map stays small.
        locks.retain(|k, lock| *k == key || Arc::strong_count(lock) > 1);
        locks.entry(key).or_default().clone()
    }

    pub(crate) async fn memory_lock(&self, key: i64) -> Box<dyn ServerLock> {
        let lock = self.lock_of(key);
        Box::new(MemoryLock {
            _guard: lock.lock_owned().await,
        })
    }

    fn try_memory_lock(&self, key: i64) -> Option<Box<dyn ServerLock>> {
        let lock = self.lock_of(key);
        lock.try_lock_owned()
            .ok()
            .map(|guard| Box::new(MemoryLock { _guard: guard }) as Box<dyn ServerLock>)
    }
}

#[async_trait]
impl Platform for SqliteStore {
    async fn limit_overrides(&self) -> Result<LimitOverrides, StoreError> {
        crate::reads::lite::limit_overrides(self.pool()).await
    }

    async fn set_limits(
        &self,
        spawn: LimitChange,
        active: LimitChange,
        by: &str,
    ) -> Result<LimitOverrides, StoreError> {
        let (set_spawn, spawn) = spawn.parts();
        let (set_active, active) = active.parts();
        let mut tx = self.write().await?;
        let row = sqlx::query_as::<_, LimitOverrides>(
            "update platform_limits set \
               concurrent_spawn_limit = case when $1 then $2 else concurrent_spawn_limit end, \
               active_server_limit = case when $3 then $4 else active_server_limit end, \
               updated_at = $6, updated_by = $5 \
             returning concurrent_spawn_limit, active_server_limit, updated_at, updated_by",
        )
        .bind(set_spawn)
        .bind(spawn)
        .bind(set_active)
        .bind(active)
        .bind(by)
        .bind(now())
        .fetch_one(&mut *tx.tx)
        .await?;
        self.commit(tx).await?;
        Ok(row)
    }

    async fn usage(&self) -> Result<Usage, StoreError> {
        let (active_servers, waiting_spawns): (i64, i64) = sqlx::query_as(
            "select (select count(*) from admission_tokens where server_id is not null), \
               (select count(*) from jobs where kind = 'spawn' and state = 'queued')",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(Usage {
            spawns_in_flight: self.memory.slots.lock().expect("slots").len() as i64,
            active_servers,
            waiting_spawns,
        })
    }

    async fn ensure_admission_places(&self, limit: u32) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        provision_admission(&mut tx, limit as i32).await?;
        self.commit(tx).await
    }

    async fn mark_fetched(&self, job_id: Uuid) -> Result<(), StoreError> {
        let at = now();
        let mut tx = self.write().await?;
        sqlx::query(
            "update jobs set claimed_by = null, claimed_at = $2 where id = $1 and state = 'queued' \
             and (claimed_by is null or claimed_at < $3)",
        )
        .bind(job_id)
        .bind(at)
        .bind(at - CLAIM_FRESH)
        .execute(&mut *tx.tx)
        .await?;
        self.commit(tx).await
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
        let mut tx = self.write().await?;
        let claimed = sqlx::query(
            "update jobs set claimed_by = $2, claimed_at = $3 where id = $1 \
             and state in ('queued', 'running') \
             and (claimed_by is null or claimed_by = $2 or claimed_at < $4)",
        )
        .bind(job_id)
        .bind(delivery)
        .bind(at)
        .bind(at - CLAIM_FRESH)
        .execute(&mut *tx.tx)
        .await?;
        if claimed.rows_affected() == 0 {
            let queued: bool = sqlx::query_scalar(
                "select exists (select 1 from jobs where id = $1 and state = 'queued')",
            )
            .bind(job_id)
            .fetch_one(&mut *tx.tx)
            .await?;
            self.commit(tx).await?;
            return Ok(if queued {
                SlotAnswer::Duplicate
            } else {
                SlotAnswer::Wait
            });
        }
        // Older spawns that a handler waits with (a fresh claim) or that the queue
        // has handed out go first; see the Postgres store.
        let older: i64 = sqlx::query_scalar(
            "select count(*) from jobs j left join queue q on q.job_id = j.id \
             where j.kind = 'spawn' and j.state = 'queued' \
             and (j.created_at < $2 or (j.created_at = $2 and j.id < $1)) \
             and (q.taken_by is not null or j.claimed_at > $3)",
        )
        .bind(job_id)
        .bind(created_at)
        .bind(at - CLAIM_FRESH)
        .fetch_one(&mut *tx.tx)
        .await?;
        let slot = {
            let mut slots = self.memory.slots.lock().expect("slots");
            let held = slots
                .iter()
                .filter(|s| (**s as i64) < i64::from(limit))
                .count() as i64;
            if older >= i64::from(limit) - held {
                None
            } else {
                let free = (0..limit as i32).find(|k| !slots.contains(k));
                if let Some(k) = free {
                    slots.insert(k);
                }
                free
            }
        };
        let Some(slot) = slot else {
            self.commit(tx).await?;
            return Ok(SlotAnswer::Wait);
        };
        let attempt = sqlx::query_scalar(
            "insert into spawn_attempts (job_id, worker, slot, started_at) values ($1, $2, $3, $4) returning id",
        )
        .bind(job_id)
        .bind(worker)
        .bind(slot)
        .bind(now())
        .fetch_one(&mut *tx.tx)
        .await;
        let committed = match attempt {
            Ok(id) => self.commit(tx).await.map(|()| id),
            Err(e) => Err(e.into()),
        };
        let attempt: i64 = match committed {
            Ok(id) => id,
            Err(e) => {
                self.memory.slots.lock().expect("slots").remove(&slot);
                return Err(e);
            }
        };
        Ok(SlotAnswer::Granted(Box::new(LiteSpawnSlot {
            store: Some(self.clone()),
            slot,
            attempt,
        })))
    }

    async fn within_active_limit(&self, server_id: i64, limit: u32) -> Result<bool, StoreError> {
        crate::reads::lite::within_active_limit(self.pool(), server_id, limit).await
    }

    async fn register_worker(&self, w: &WorkerInfo) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "insert into workers (name, host, pid, backend, version, started_at, last_seen) \
             values ($1, $2, $3, $4, $5, $6, $6) \
             on conflict (name) do update set host = $2, pid = $3, backend = $4, version = $5, \
             started_at = $6, last_seen = $6, jobs_in_flight = 0, stopped_at = null",
        )
        .bind(&w.name)
        .bind(&w.host)
        .bind(w.pid)
        .bind(&w.backend)
        .bind(&w.version)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        self.commit(tx).await
    }

    async fn worker_heartbeat(&self, name: &str, jobs_in_flight: i32) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query("update workers set last_seen = $3, jobs_in_flight = $2 where name = $1")
            .bind(name)
            .bind(jobs_in_flight)
            .bind(now())
            .execute(&mut *tx.tx)
            .await?;
        self.commit(tx).await
    }

    async fn worker_stopped(&self, name: &str) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "update workers set stopped_at = $2, last_seen = $2, jobs_in_flight = 0 where name = $1",
        )
        .bind(name)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        self.commit(tx).await
    }

    async fn list_workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        crate::reads::lite::list_workers(self.pool()).await
    }

    async fn try_reconcile_lock(&self) -> Result<Option<Box<dyn ServerLock>>, StoreError> {
        Ok(self.try_memory_lock(RECONCILER))
    }

    async fn try_lock_server(
        &self,
        server_id: i64,
    ) -> Result<Option<Box<dyn ServerLock>>, StoreError> {
        Ok(self.try_memory_lock(server_id))
    }

    async fn live_servers(&self) -> Result<Vec<ServerRow>, StoreError> {
        crate::reads::lite::live_servers(self.pool()).await
    }

    async fn mark_lost(
        &self,
        server_id: i64,
        failed: bool,
        error: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let done = sqlx::query(
            "update servers set state = $2, error = $3, url = null, container_id = null, token_hash = null, \
             stopped_at = $4, updated_at = $4 where id = $1 and state = 'running'",
        )
        .bind(server_id)
        .bind(if failed { "failed" } else { "stopped" })
        .bind(error)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        let done = done.rows_affected() == 1;
        if done {
            super::store::release_admission(&mut tx, server_id).await?;
        }
        self.commit(tx).await?;
        Ok(done)
    }

    async fn close_stale_attempts(&self) -> Result<u64, StoreError> {
        // An open record whose slot this process does not hold is from before a
        // restart: the process that held it is gone. Read under the writers' turn: a
        // slot is taken and its record written within one turn.
        let mut tx = self.write().await?;
        let held: Vec<i32> = self
            .memory
            .slots
            .lock()
            .expect("slots")
            .iter()
            .copied()
            .collect();
        let done = sqlx::query(
            "update spawn_attempts set ended_at = coalesce( \
               (select w.last_seen from workers w where w.name = spawn_attempts.worker), $2) \
             where ended_at is null and slot not in (select value from json_each($1))",
        )
        .bind(super::json_list(&held))
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        self.commit(tx).await?;
        Ok(done.rows_affected())
    }
}

struct LiteSpawnSlot {
    store: Option<SqliteStore>,
    slot: i32,
    attempt: i64,
}

impl LiteSpawnSlot {
    fn free(memory: &Memory, slot: i32) {
        memory.slots.lock().expect("slots").remove(&slot);
    }
}

#[async_trait]
impl SpawnSlot for LiteSpawnSlot {
    fn slot(&self) -> i32 {
        self.slot
    }

    async fn release(mut self: Box<Self>) {
        let Some(store) = self.store.take() else {
            return;
        };
        let ended = async {
            let mut tx = store.write().await?;
            sqlx::query("update spawn_attempts set ended_at = $2 where id = $1")
                .bind(self.attempt)
                .bind(Utc::now())
                .execute(&mut *tx.tx)
                .await?;
            store.commit(tx).await
        }
        .await;
        if let Err(e) = ended {
            tracing::warn!(error = %e, "could not record the end of a spawn");
        }
        Self::free(&store.memory, self.slot);
        // After freeing, so that a woken waiter finds the slot free.
        store.slot_freed.notify_waiters();
    }
}

impl Drop for LiteSpawnSlot {
    fn drop(&mut self) {
        // Not released (a panic or a cancelled task): the slot is free again.
        if let Some(store) = self.store.take() {
            Self::free(&store.memory, self.slot);
            store.slot_freed.notify_waiters();
        }
    }
}
