//! Which database runs a statement. Berth's store logic is written once, over
//! [`Db`]; a statement runs on whichever database the store was opened on through
//! [`each!`], which type-checks the same code against both drivers. Where the
//! dialects really differ (arrays, row locks), the two statements sit side by side
//! in a `match` on [`Dialect`].
//!
//! The seams below the logic are three: the database a statement runs on (this
//! module, with [`Tx`] carrying the work to do after a commit), coordination (server
//! locks and spawn slots: advisory locks on Postgres, memory in the one embedded
//! process) and enqueueing ([`crate::queue::Queue`], which writes through the same
//! transaction).

use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Postgres, SqliteConnection, SqlitePool};
use uuid::Uuid;

use crate::{
    PgStore, SqliteStore,
    console::{PROGRESS_CHANNEL, ProgressStep},
    jobs::{JobEnvelope, JobKind, JobRow},
    platform::Limits,
    queue::Queue,
    spawn_batch::SpawnBatcher,
    store::StoreError,
    telemetry,
};

/// One thing in either dialect: a pool, a connection, a store.
#[derive(Clone, Copy, Debug)]
pub enum Dialect<P, L> {
    Pg(P),
    Lite(L),
}

/// Runs `$body` with `$c` bound to whichever side `$on` is. The body is written
/// once and compiled for both drivers, so it must be valid SQL in both.
#[macro_export]
#[doc(hidden)]
macro_rules! each {
    ($on:expr, $c:ident => $body:expr) => {
        match $on {
            $crate::db::Dialect::Pg($c) => $body,
            $crate::db::Dialect::Lite($c) => $body,
        }
    };
}
pub(crate) use each;

/// Runs one statement, `$sql` with each `$arg` bound in turn, on either side of
/// `$conn`; the number of rows it changed.
macro_rules! execute {
    ($conn:expr, $sql:expr $(, $arg:expr)* $(,)?) => {
        $crate::db::each!($conn, c => sqlx::query($sql)
            $(.bind($arg))*
            .execute(c)
            .await
            .map(|r| r.rows_affected()))
    };
}
pub(crate) use execute;

/// `execute!` in a write transaction of its own, on the store `$db`.
macro_rules! apply {
    ($db:expr, $sql:expr $(, $arg:expr)* $(,)?) => {
        $db.write(async |tx| Ok($crate::db::execute!(tx.conn(), $sql $(, $arg)*)?))
            .await
    };
}
pub(crate) use apply;

/// A read that locks its rows on Postgres (`$lock` appended to the statement) and
/// needs no lock on SQLite, whose writers take turns. `$sql` is a literal.
macro_rules! locking {
    ($tx:expr, $sql:expr, $lock:literal, |$c:ident, $q:ident| $body:expr) => {
        match $tx.conn() {
            $crate::db::Dialect::Pg($c) => {
                let $q = concat!($sql, " ", $lock);
                $body
            }
            $crate::db::Dialect::Lite($c) => {
                let $q = $sql;
                $body
            }
        }
    };
}
pub(crate) use locking;

/// A connection of either dialect, for one statement.
pub type Conn<'a> = Dialect<&'a mut PgConnection, &'a mut SqliteConnection>;
/// A pool of either dialect, for reads outside a transaction.
pub(crate) type Pool<'a> = Dialect<&'a PgPool, &'a SqlitePool>;

/// The current time as Berth stores it: whole microseconds, the resolution of a
/// Postgres timestamp. Every time is bound from Rust, on both dialects, so the
/// caller decides what "now" is and SQLite's text times order as times.
pub fn now() -> DateTime<Utc> {
    use chrono::DurationRound;
    let now = Utc::now();
    now.duration_trunc(chrono::TimeDelta::microseconds(1))
        .unwrap_or(now)
}

/// The store over either database; cheap to clone.
#[derive(Clone)]
pub struct Db {
    on: Dialect<PgStore, SqliteStore>,
    queue: Arc<dyn Queue>,
    /// The platform limits as configured; an admin's overrides in the database win.
    configured: Limits,
    /// Postgres: the task that decides concurrent spawn requests together, started
    /// at the first request (`spawn_batch`); `None` where requests go alone.
    spawns: Option<Arc<OnceLock<Option<SpawnBatcher>>>>,
}

impl From<PgStore> for Db {
    fn from(store: PgStore) -> Self {
        let queue = store.queue_handle();
        Self {
            on: Dialect::Pg(store),
            queue,
            configured: Limits::default(),
            spawns: Some(Arc::default()),
        }
    }
}

impl From<SqliteStore> for Db {
    fn from(store: SqliteStore) -> Self {
        let queue = Arc::new(crate::lite::queue::EmbeddedQueue::new(store.enqueued()));
        Self {
            on: Dialect::Lite(store),
            queue,
            configured: Limits::default(),
            spawns: Some(Arc::default()),
        }
    }
}

impl Db {
    /// The store with the platform limits as configured.
    pub fn with_limits(mut self, configured: Limits) -> Self {
        self.configured = configured;
        // Its batches are decided with these limits: a batcher of its own.
        if self.spawns.is_some() {
            self.spawns = Some(Arc::default());
        }
        self
    }

    /// The platform limits as configured (before an admin's overrides).
    pub fn configured_limits(&self) -> Limits {
        self.configured
    }

    /// Where this store's spawn requests go together, if anywhere.
    pub(crate) fn spawn_batcher(&self) -> Option<&SpawnBatcher> {
        let cell = self.spawns.as_ref()?;
        cell.get_or_init(|| {
            SpawnBatcher::start(Self {
                spawns: None,
                ..self.clone()
            })
        })
        .as_ref()
    }

    pub(crate) fn pool(&self) -> Pool<'_> {
        match &self.on {
            Dialect::Pg(s) => Dialect::Pg(s.pool()),
            Dialect::Lite(s) => Dialect::Lite(s.pool()),
        }
    }

    pub(crate) fn queue(&self) -> &dyn Queue {
        self.queue.as_ref()
    }

    pub fn on(&self) -> &Dialect<PgStore, SqliteStore> {
        &self.on
    }

    /// A write transaction. On SQLite writers take turns (`BEGIN IMMEDIATE` behind
    /// one mutex), so what Postgres does with `for update` is serialised there.
    pub(crate) async fn begin(&self) -> Result<Tx, StoreError> {
        let inner = match &self.on {
            Dialect::Pg(s) => Dialect::Pg(s.pool().begin().await?),
            Dialect::Lite(s) => Dialect::Lite(s.write().await?),
        };
        Ok(Tx {
            inner,
            store: self.clone(),
            enqueued: false,
            routes: vec![],
            notices: vec![],
        })
    }

    /// Runs `work` in a write transaction and commits it; an error rolls it back.
    pub(crate) async fn write<T>(
        &self,
        work: impl AsyncFnOnce(&mut Tx) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut tx = self.begin().await?;
        let out = work(&mut tx).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// A job row and its queue entry in `tx`, with a fresh time-ordered id.
    pub(crate) async fn insert_job(
        &self,
        tx: &mut Tx,
        kind: JobKind,
        user: &str,
        server: Option<&str>,
        payload: serde_json::Value,
    ) -> Result<JobRow, StoreError> {
        self.insert_job_as(tx, Uuid::now_v7(), kind, user, server, payload)
            .await
    }

    /// A job (with the caller's time-ordered id) and its queue entry in one
    /// transaction of their own: what the requests do inside theirs, for jobs that
    /// change nothing else (benchmarks of the queue).
    pub async fn enqueue(
        &self,
        id: Uuid,
        kind: JobKind,
        user: &str,
        payload: serde_json::Value,
    ) -> Result<JobRow, StoreError> {
        let mut tx = self.begin().await?;
        let job = self
            .insert_job_as(&mut tx, id, kind, user, None, payload)
            .await?;
        tx.commit().await?;
        Ok(job)
    }

    /// `insert_job` with an id chosen beforehand (a schedule's tick names its job).
    pub(crate) async fn insert_job_as(
        &self,
        tx: &mut Tx,
        id: Uuid,
        kind: JobKind,
        user: &str,
        server: Option<&str>,
        payload: serde_json::Value,
    ) -> Result<JobRow, StoreError> {
        let at = now();
        let job = each!(tx.conn(), c => sqlx::query_as::<_, JobRow>(
            "insert into jobs (id, kind, user_name, user_id, server_name, payload, created_at) \
             values ($1, $2, $3, (select id from users where name = $3), $4, $5, $6) \
             returning *",
        )
        .bind(id)
        .bind(kind.as_str())
        .bind(user)
        .bind(server)
        .bind(&payload)
        .bind(at)
        .fetch_one(c)
        .await)?;
        let envelope = JobEnvelope { job_id: id, kind };
        self.queue.enqueue(tx.conn(), &envelope, at).await?;
        if let Some((channel, payload)) = self.queue.notice(&envelope) {
            tx.notify_after_commit(channel, payload);
        }
        tx.enqueued = true;
        telemetry::job_enqueued(kind);
        Ok(job)
    }
}

/// Where a part of a transaction began (`Tx::part`): what it had to tell then.
pub(crate) struct Part {
    routes: usize,
    notices: usize,
    progress: usize,
}

/// A write transaction on either database, with what to do once it commits:
/// hand enqueued jobs to the broker, wake the embedded store's waiters.
pub(crate) struct Tx {
    inner: Dialect<sqlx::Transaction<'static, Postgres>, crate::lite::Tx>,
    store: Db,
    enqueued: bool,
    /// Servers whose route (state, address) this transaction changes.
    routes: Vec<i64>,
    /// Notifications (channel, payload) to send once this transaction commits.
    notices: Vec<(&'static str, String)>,
}

impl Tx {
    pub(crate) fn conn(&mut self) -> Conn<'_> {
        match &mut self.inner {
            Dialect::Pg(tx) => Dialect::Pg(&mut **tx),
            Dialect::Lite(tx) => Dialect::Lite(&mut *tx.tx),
        }
    }

    /// Appends a spawn's progress event; its listeners hear of it after the commit
    /// (the transaction remembers it: see `commit`).
    pub(crate) async fn insert_progress(
        &mut self,
        job_id: Uuid,
        step: &ProgressStep,
    ) -> Result<(), StoreError> {
        let at = now();
        match &mut self.inner {
            Dialect::Pg(tx) => {
                sqlx::query(
                    "insert into spawn_events \
                       (job_id, progress, message, ready, failed, url, created_at) \
                     values ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(job_id)
                .bind(step.progress.clamp(0, 100))
                .bind(&step.message)
                .bind(step.ready)
                .bind(step.failed)
                .bind(&step.url)
                .bind(at)
                .execute(&mut **tx)
                .await?;
                self.notices.push((PROGRESS_CHANNEL, job_id.to_string()));
            }
            Dialect::Lite(tx) => {
                sqlx::query(
                    "insert into spawn_events \
                       (job_id, progress, message, ready, failed, url, created_at) \
                     values ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(job_id)
                .bind(step.progress.clamp(0, 100))
                .bind(&step.message)
                .bind(step.ready)
                .bind(step.failed)
                .bind(&step.url)
                .bind(at)
                .execute(&mut *tx.tx)
                .await?;
                tx.progress.push(job_id);
            }
        }
        Ok(())
    }

    /// Tells the proxies, once this transaction commits, that a server's route
    /// changed: whoever caches its owner's routes reads them again.
    pub(crate) fn route_changed(&mut self, server_id: i64) {
        self.routes.push(server_id);
    }

    /// Jobs were enqueued through this transaction: the queue flushes after the commit.
    pub(crate) fn mark_enqueued(&mut self) {
        self.enqueued = true;
    }

    /// Sends `payload` on `channel` once this transaction commits (Postgres).
    pub(crate) fn notify_after_commit(&mut self, channel: &'static str, payload: String) {
        self.notices.push((channel, payload));
    }

    /// Starts a part of this transaction that can be undone alone (`undo`) or
    /// kept (`keep`): one request of several sharing a commit.
    pub(crate) async fn part(&mut self) -> Result<Part, StoreError> {
        each!(self.conn(), c => sqlx::query("savepoint part").execute(c).await.map(|_| ()))?;
        Ok(Part {
            routes: self.routes.len(),
            notices: self.notices.len(),
            progress: match &self.inner {
                Dialect::Lite(tx) => tx.progress.len(),
                Dialect::Pg(_) => 0,
            },
        })
    }

    /// Keeps what was written since `part`.
    pub(crate) async fn keep(&mut self, _part: Part) -> Result<(), StoreError> {
        each!(self.conn(), c => sqlx::query("release savepoint part").execute(c).await.map(|_| ()))?;
        Ok(())
    }

    /// Undoes what was written since `part`, and forgets what it would have told
    /// after the commit.
    pub(crate) async fn undo(&mut self, part: Part) -> Result<(), StoreError> {
        each!(self.conn(), c => sqlx::query("rollback to savepoint part").execute(c).await.map(|_| ()))?;
        each!(self.conn(), c => sqlx::query("release savepoint part").execute(c).await.map(|_| ()))?;
        self.routes.truncate(part.routes);
        self.notices.truncate(part.notices);
        if let Dialect::Lite(tx) = &mut self.inner {
            tx.progress.truncate(part.progress);
        }
        Ok(())
    }

    pub(crate) async fn commit(self) -> Result<(), StoreError> {
        let Tx {
            inner,
            store,
            enqueued,
            routes,
            notices,
        } = self;
        match (inner, &store.on) {
            (Dialect::Pg(tx), Dialect::Pg(pg)) => {
                tx.commit().await?;
                // After the commit, never inside it: see `pg_notify`.
                pg.notifier().send(notices, routes).await;
            }
            (Dialect::Lite(mut tx), Dialect::Lite(lite)) => {
                let owners: Vec<i64> = if routes.is_empty() {
                    vec![]
                } else {
                    sqlx::query_scalar(
                        "select distinct user_id from servers \
                         where id in (select value from json_each($1))",
                    )
                    .bind(json_list(&routes))
                    .fetch_all(&mut *tx.tx)
                    .await?
                };
                lite.commit(tx, &owners).await?
            }
            (Dialect::Lite(_), Dialect::Pg(_)) | (Dialect::Pg(_), Dialect::Lite(_)) => {
                unreachable!("a transaction of its own store")
            }
        }
        if enqueued {
            store.queue.flush().await;
        }
        Ok(())
    }
}

/// Each item as a JSON array, for SQLite's `in (select value from json_each($n))`
/// where Postgres takes an array (`= any($n)`).
pub(crate) fn json_list<T: serde::Serialize>(items: &[T]) -> String {
    serde_json::to_string(items).expect("a list serialises")
}
