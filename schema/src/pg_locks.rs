//! Postgres session advisory locks, each held on a connection of its own, so that
//! a process that dies releases every lock it held with its connections.

use async_trait::async_trait;
use sqlx::{PgPool, Postgres, pool::PoolConnection};

use crate::store::{ServerLock, StoreError};

/// Lock keys of servers live in their own advisory-lock space.
pub(crate) const SERVER_LOCK_SPACE: i32 = 0x4245_5254; // "BERT"

/// Folds a server id into the 32-bit key of a two-key advisory lock. Two servers
/// that share a key only serialise with each other, which is harmless.
pub(crate) fn lock_key(server_id: i64) -> i32 {
    (server_id ^ (server_id >> 32)) as i32
}

/// A Postgres session advisory lock held on a connection of its own.
pub(crate) struct SessionLock {
    conn: Option<PoolConnection<Postgres>>,
    space: i32,
    key: i32,
}

impl SessionLock {
    /// Waits for the lock. It asks again every 20–250 ms rather than blocking in
    /// `pg_advisory_lock`, so that a waiter holds no pool connection while it
    /// waits: under a redelivery storm blocked waiters starved the pool (seen in
    /// the NATS restart test).
    pub(crate) async fn take(
        pool: &PgPool,
        space: i32,
        key: i32,
    ) -> Result<Box<dyn ServerLock>, StoreError> {
        let mut pause = std::time::Duration::from_millis(20);
        loop {
            if let Some(lock) = Self::try_take(pool, space, key).await? {
                return Ok(lock);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(250));
        }
    }

    /// Takes the lock if nobody holds it.
    pub(crate) async fn try_take(
        pool: &PgPool,
        space: i32,
        key: i32,
    ) -> Result<Option<Box<dyn ServerLock>>, StoreError> {
        let mut conn = pool.acquire().await?;
        let got: bool = sqlx::query_scalar("select pg_try_advisory_lock($1, $2)")
            .bind(space)
            .bind(key)
            .fetch_one(&mut *conn)
            .await?;
        Ok(got.then(|| {
            Box::new(Self {
                conn: Some(conn),
                space,
                key,
            }) as Box<dyn ServerLock>
        }))
    }
}

#[async_trait]
impl ServerLock for SessionLock {
    async fn release(mut self: Box<Self>) {
        if let Some(mut conn) = self.conn.take() {
            let unlocked = sqlx::query("select pg_advisory_unlock($1, $2)")
                .bind(self.space)
                .bind(self.key)
                .execute(&mut *conn)
                .await;
            if unlocked.is_err() {
                // The session ends with the connection, and the lock with it.
                conn.close_on_drop();
            }
        }
    }
}

impl Drop for SessionLock {
    fn drop(&mut self) {
        // Not released (a panic or a cancelled task): close the session so that
        // Postgres frees the lock, rather than handing a locked connection back.
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}
