//! The contract shared by every Berth process: migrations, names, rows, job types,
//! and the store and queue interfaces.

#[macro_use]
mod text;
#[macro_use]
pub mod rows;
pub mod accounts;
mod archive;
mod backend;
pub mod console;
pub mod db;
pub mod identities;
pub mod jobs;
pub mod lite;
pub mod maintenance;
pub mod names;
pub mod nats;
pub mod pg;
pub mod pg_locks;
pub mod pg_notify;
pub mod platform;
pub mod profiles;
pub mod queue;
pub mod routes;
pub mod server_logs;
pub(crate) mod servers;
pub mod settings;
mod spawn_batch;
pub mod store;
pub mod telemetry;

pub use accounts::{Accounts, NewAccount, Role};
pub use backend::QueueSettings;
pub use console::Console;
pub use db::Db;
pub use jobs::{JobEnvelope, JobKind, JobOutcome, JobRow, JobState};
pub use lite::SqliteStore;
pub use maintenance::Maintenance;
pub use names::{
    DEFAULT_INSTANCE, EngineNames, InvalidName, ServerName, UserName, check_instance,
    container_name, server_path,
};
pub use pg::PgStore;
pub use platform::{Limits, Platform};
pub use queue::{ApalisQueue, Queue, QueueError};
pub use routes::{Route, RouteChange, Routes};
pub use rows::{ServerRow, ServerState, UserRow, UserState};
pub use store::{Running, ServerLock, SpawnOutcome, SpawnRequest, StopOutcome, Store, StoreError};

/// The server image when neither the request nor `BERTH_IMAGE` names one.
pub const DEFAULT_IMAGE: &str = "quay.io/jupyter/base-notebook:latest";

/// Berth's own migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Brings a database up to date: Berth's tables and the queue backend's.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), MigrateError> {
    queue::setup_apalis(pool).await?;
    MIGRATOR.run(pool).await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("queue tables: {0}")]
    Queue(#[from] QueueError),
    #[error("berth tables: {0}")]
    Berth(#[from] sqlx::migrate::MigrateError),
}

/// The store's interfaces, for code that calls them on a [`Db`].
pub mod prelude {
    pub use crate::{
        accounts::Accounts as _, console::Console as _, identities::Identities as _,
        maintenance::Maintenance as _, platform::Platform as _, profiles::Profiles as _,
        routes::Routes as _, store::Store as _,
    };
}
