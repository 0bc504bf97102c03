//! Postgres session advisory locks, each held on a connection of its own, so that
//! a process that dies releases every lock it held with its connections.

use async_trait::async_trait;
use sqlx::{PgPool, Postgres, pool::PoolConnection};

use crate::{
    platform::SpawnSlot,
    store::{ServerLock, StoreError},
};

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

/// Advisory-lock spaces (the first key of two-key locks) of spawn slots and of the
/// reconciler.
pub(crate) const SLOT_SPACE: i32 = 0x4253_5054; // "BSPT"
pub(crate) const RECONCILE_SPACE: i32 = 0x4252_4543; // "BREC"

/// NOTIFY channel on which a freed spawn slot is announced.
pub const SLOT_FREED_CHANNEL: &str = "berth_slot_freed";

/// How many spawn slots below `below` are held right now, platform-wide.
pub(crate) async fn held_slots(pool: &PgPool, below: i64) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "select count(*) from pg_locks where locktype = 'advisory' and granted \
           and classid::bigint = $1 and objsubid = 2 and objid::bigint < $2 \
           and database = (select oid from pg_database where datname = current_database())",
    )
    .bind(i64::from(SLOT_SPACE))
    .bind(below)
    .fetch_one(pool)
    .await?)
}

/// Takes the lowest free slot below `limit` as a session lock on a connection of
/// its own, and records the attempt on it. `None` when every slot is taken.
pub(crate) async fn take_slot(
    pool: &PgPool,
    limit: u32,
    record: impl AsyncFnOnce(&mut sqlx::PgConnection, i32) -> Result<i64, StoreError>,
) -> Result<Option<Box<dyn SpawnSlot>>, StoreError> {
    let mut conn = pool.acquire().await?;
    let slot: Option<i32> = sqlx::query_scalar("select berth_try_spawn_slot($1, $2)")
        .bind(SLOT_SPACE)
        .bind(limit as i32)
        .fetch_one(&mut *conn)
        .await?;
    let Some(slot) = slot else {
        return Ok(None);
    };
    match record(&mut conn, slot).await {
        Ok(attempt) => Ok(Some(Box::new(PgSpawnSlot {
            conn: Some(conn),
            slot,
            attempt,
        }))),
        Err(e) => {
            // Do not keep a slot we cannot account for.
            conn.close_on_drop();
            Err(e)
        }
    }
}

/// A held spawn slot: a session advisory lock, freed with its connection if the
/// worker dies.
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
