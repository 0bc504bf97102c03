//! The embedded store: every Berth interface on one SQLite file, for `berth up`
//! on a machine with no Postgres and no broker.
//!
//! One process owns the file (it holds an exclusive lock on `berth.lock` beside
//! it), so what Postgres does across processes is done here in memory: server
//! locks are mutexes, spawn slots a set of held numbers, and the notifications
//! (a slot freed, spawn progress, a job enqueued) go through channels. Writers
//! take turns on one mutex and write in `BEGIN IMMEDIATE` transactions; readers
//! read the WAL concurrently. Commits are synchronous (`synchronous = FULL`), so
//! a 202 means the job survives a power cut, as it does on Postgres.

mod memory;
pub mod queue;

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use sqlx::{
    Sqlite, SqlitePool, Transaction,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use uuid::Uuid;

use crate::store::StoreError;

/// Berth's migrations for the embedded store.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations_sqlite");

/// The file name of the database inside the data directory.
pub const DATABASE_FILE: &str = "berth.db";

#[derive(Default)]
pub(crate) struct Memory {
    /// Held server locks (and the reconciler's, as server 0).
    pub(crate) locks: Mutex<HashMap<i64, Arc<tokio::sync::Mutex<()>>>>,
    /// Spawn slots held right now.
    pub(crate) slots: Mutex<BTreeSet<i32>>,
}

/// The embedded store; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    writer: Arc<tokio::sync::Mutex<()>>,
    memory: Arc<Memory>,
    progress: tokio::sync::broadcast::Sender<Uuid>,
    routes: tokio::sync::broadcast::Sender<i64>,
    slot_freed: Arc<tokio::sync::Notify>,
    enqueued: Arc<tokio::sync::Notify>,
    /// The lock on the data directory: held for as long as any clone lives.
    _owner: Arc<std::fs::File>,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("data directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error(
        "another Berth process is using {0}; stop it first (one `berth up` per data directory)"
    )]
    InUse(PathBuf),
    #[error("opening {0}: {1}")]
    Open(PathBuf, sqlx::Error),
    #[error("migrating {0}: {1}")]
    Migrate(PathBuf, sqlx::migrate::MigrateError),
}

/// When a commit is on disk. Berth runs with `Full`: a 202 means the job survives a
/// power cut. The others exist to measure what that costs (`ops/bench/queues`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// WAL synced at every commit.
    #[default]
    Full,
    /// WAL synced at checkpoints: a power cut may lose the last commits.
    Normal,
    /// Never synced: the operating system decides.
    Off,
}

impl SqliteStore {
    /// Opens (creating and migrating when needed) the database in `dir`.
    pub async fn open(dir: &Path) -> Result<Self, OpenError> {
        Self::open_with(dir, Durability::Full).await
    }

    /// `open` with a durability of the caller's choosing.
    pub async fn open_with(dir: &Path, durability: Durability) -> Result<Self, OpenError> {
        std::fs::create_dir_all(dir).map_err(|e| OpenError::Dir(dir.into(), e))?;
        // Berth's alone: the database and its secrets are no one else's to read.
        private(dir).map_err(|e| OpenError::Dir(dir.into(), e))?;
        let lock_path = dir.join("berth.lock");
        let owner = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| OpenError::Dir(lock_path.clone(), e))?;
        if owner.try_lock().is_err() {
            return Err(OpenError::InUse(dir.into()));
        }
        let path = dir.join(DATABASE_FILE);
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(|e| OpenError::Open(path.clone(), e))?
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                Durability::Full => SqliteSynchronous::Full,
                Durability::Normal => SqliteSynchronous::Normal,
                Durability::Off => SqliteSynchronous::Off,
            })
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| OpenError::Open(path.clone(), e))?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| OpenError::Migrate(path.clone(), e))?;
        for file in [DATABASE_FILE, "berth.db-wal", "berth.db-shm", "berth.lock"] {
            let file = dir.join(file);
            if file.exists() {
                private_file(&file).map_err(|e| OpenError::Dir(file, e))?;
            }
        }
        let (progress, _) = tokio::sync::broadcast::channel(1024);
        let (routes, _) = tokio::sync::broadcast::channel(1024);
        let store = Self {
            pool,
            writer: Arc::new(tokio::sync::Mutex::new(())),
            memory: Arc::new(Memory::default()),
            progress,
            routes,
            slot_freed: Arc::new(tokio::sync::Notify::new()),
            enqueued: Arc::new(tokio::sync::Notify::new()),
            _owner: Arc::new(owner),
            path,
        };
        Ok(store)
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hears of every progress event once its transaction has committed.
    pub(crate) fn progress(&self) -> tokio::sync::broadcast::Receiver<Uuid> {
        self.progress.subscribe()
    }

    /// Hears of every user whose servers' routes changed, once the change committed.
    pub(crate) fn route_changes(&self) -> tokio::sync::broadcast::Receiver<i64> {
        self.routes.subscribe()
    }

    /// Notified whenever a spawn slot is given back.
    pub fn slot_freed(&self) -> Arc<tokio::sync::Notify> {
        self.slot_freed.clone()
    }

    /// A write transaction: writers take turns, so `BEGIN IMMEDIATE` never waits
    /// on another writer of this process.
    pub(crate) async fn write(&self) -> Result<Tx, StoreError> {
        let guard = self.writer.clone().lock_owned().await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok(Tx {
            tx,
            _guard: guard,
            progress: vec![],
        })
    }

    /// Commits `tx`, then tells whoever waits what it wrote: its progress events
    /// and the users whose servers' routes changed.
    pub(crate) async fn commit(&self, tx: Tx, routes: &[i64]) -> Result<(), StoreError> {
        let Tx {
            tx,
            _guard,
            progress,
        } = tx;
        tx.commit().await?;
        drop(_guard);
        for job in progress {
            let _ = self.progress.send(job);
        }
        for user in routes {
            let _ = self.routes.send(*user);
        }
        Ok(())
    }
}

/// A write transaction holding the writers' turn.
pub(crate) struct Tx {
    pub(crate) tx: Transaction<'static, Sqlite>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
    pub(crate) progress: Vec<Uuid>,
}

/// Makes a directory its owner's alone (0700).
fn private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Makes a file its owner's alone (0600).
fn private_file(file: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))
}
