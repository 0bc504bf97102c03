//! Coordination within the one embedded process: server locks are mutexes, spawn
//! slots a set of held numbers, a freed slot a `Notify`.

use std::sync::Arc;

use super::SqliteStore;
use crate::{platform::SpawnSlot, store::ServerLock};
use async_trait::async_trait;

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

    pub(crate) fn try_memory_lock(&self, key: i64) -> Option<Box<dyn ServerLock>> {
        let lock = self.lock_of(key);
        lock.try_lock_owned()
            .ok()
            .map(|guard| Box::new(MemoryLock { _guard: guard }) as Box<dyn ServerLock>)
    }

    /// The slots held right now.
    pub(crate) fn held_slots(&self) -> Vec<i32> {
        self.memory
            .slots
            .lock()
            .expect("slots")
            .iter()
            .copied()
            .collect()
    }

    /// Takes the lowest free slot below `limit`, if any. The caller records the
    /// attempt in the same writers' turn, or gives the slot back with `free_slot`.
    pub(crate) fn take_memory_slot(&self, limit: u32) -> Option<i32> {
        let mut slots = self.memory.slots.lock().expect("slots");
        let free = (0..limit as i32).find(|k| !slots.contains(k));
        if let Some(k) = free {
            slots.insert(k);
        }
        free
    }

    pub(crate) fn free_slot(&self, slot: i32) {
        self.memory.slots.lock().expect("slots").remove(&slot);
        // After freeing, so that a woken waiter finds the slot free.
        self.slot_freed.notify_waiters();
    }

    /// The held slot `slot`, whose attempt is recorded as `attempt`.
    pub(crate) fn spawn_slot(&self, slot: i32, attempt: i64) -> Box<dyn SpawnSlot> {
        Box::new(LiteSpawnSlot {
            store: Some(self.clone()),
            slot,
            attempt,
        })
    }
}

struct LiteSpawnSlot {
    store: Option<SqliteStore>,
    slot: i32,
    attempt: i64,
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
                .bind(crate::db::now())
                .execute(&mut *tx.tx)
                .await?;
            store.commit(tx, &[]).await
        }
        .await;
        if let Err(e) = ended {
            tracing::warn!(error = %e, "could not record the end of a spawn");
        }
        store.free_slot(self.slot);
    }
}

impl Drop for LiteSpawnSlot {
    fn drop(&mut self) {
        // Not released (a panic or a cancelled task): the slot is free again.
        if let Some(store) = self.store.take() {
            store.free_slot(self.slot);
        }
    }
}
