//! The Postgres store.

use std::sync::Arc;

use sqlx::PgPool;

use crate::{
    pg_locks::{SERVER_LOCK_SPACE, SessionLock, lock_key},
    queue::Queue,
    store::{ServerLock, StoreError},
};

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

    pub(crate) fn queue_handle(&self) -> Arc<dyn Queue> {
        self.queue.clone()
    }

    pub(crate) async fn lock_server(
        &self,
        server_id: i64,
    ) -> Result<Box<dyn ServerLock>, StoreError> {
        SessionLock::take(&self.pool, SERVER_LOCK_SPACE, lock_key(server_id)).await
    }
}
