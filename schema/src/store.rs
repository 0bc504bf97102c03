//! The store interface shared by the API and the workers.

use async_trait::async_trait;
use uuid::Uuid;

use crate::{
    jobs::{JobOutcome, JobRow},
    names::{ServerName, UserName},
    queue::QueueError,
    rows::{ServerRow, UserRow},
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A limit is reached (the API answers 429).
    #[error("{0}")]
    Limit(String),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Reading or writing files (archives).
    #[error("file: {0}")]
    Io(String),
    /// A stored value that no longer reads (a profile's definition).
    #[error("stored data: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// The user a request names does not exist.
    pub fn no_user(user: &UserName) -> Self {
        StoreError::NotFound(format!("no user named {user:?}"))
    }

    /// A spawn for a user whose removal is under way.
    pub(crate) fn user_deleting(user: &UserName) -> Self {
        StoreError::Conflict(format!("user {:?} is being deleted", user.as_str()))
    }

    /// A spawn for a server that is stopping.
    pub(crate) fn server_stopping() -> Self {
        StoreError::Conflict("the server is stopping; start it again once it has stopped".into())
    }

    /// A spawn past the per-user limit: the user already has `live` servers.
    pub(crate) fn per_user_limit(user: &UserName, live: i64, most: u32) -> Self {
        StoreError::Limit(format!(
            "user {:?} already has {live} servers, the most allowed per user is {most}; \
             stop one first",
            user.as_str()
        ))
    }

    /// A spawn past the platform's limit of active servers.
    /// A profile's own limit is reached. Its places are all taken or being taken
    /// (a claim skips places other requests hold uncommitted, which a count would
    /// not see yet), so the message gives the limit, not a count.
    pub(crate) fn profile_full(profile: &str, limit: i32) -> Self {
        StoreError::Limit(format!(
            "profile {profile:?} is full: all {limit} of its places are taken; try again \
             when one of its servers stops, or pick another profile"
        ))
    }

    pub(crate) fn platform_full(active: i64, limit: i32) -> Self {
        StoreError::Limit(format!(
            "the platform is full: {active} of {limit} servers are active; try again when one stops"
        ))
    }
}

/// What a spawn request led to.
#[derive(Debug)]
pub enum SpawnOutcome {
    /// A spawn job was enqueued now.
    Enqueued(ServerRow),
    /// A spawn was already pending: no second job.
    AlreadyPending(ServerRow),
    /// The server is already running.
    AlreadyRunning(ServerRow),
}

/// What a stop request led to.
#[derive(Debug)]
pub enum StopOutcome {
    Enqueued(ServerRow),
    AlreadyStopping(ServerRow),
    /// Stopped or failed already: nothing to do.
    NotRunning(ServerRow),
}

#[derive(Debug, Clone)]
pub struct SpawnRequest {
    pub user: UserName,
    pub server: ServerName,
    /// An image the API has checked against the allowed list; `None` uses the default.
    pub image: Option<String>,
    /// Most servers the user may have pending or running at once; `None`: no limit.
    pub max_servers_per_user: Option<u32>,
    /// The profile the API resolved and allowed; the server keeps this copy.
    pub profile: Option<crate::profiles::Profile>,
}

/// A per-server lock held while a worker acts on the server. It is a session lock
/// in Postgres, so a worker that dies releases it with its connection.
#[async_trait]
pub trait ServerLock: Send {
    async fn release(self: Box<Self>);
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Answers when the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Creates an active user; a taken name is a conflict.
    async fn create_user(&self, name: &UserName, admin: bool) -> Result<UserRow, StoreError>;
    async fn get_user(&self, name: &UserName) -> Result<Option<UserRow>, StoreError>;
    async fn list_users(&self) -> Result<Vec<UserRow>, StoreError>;
    /// The servers of the given users, ordered by user and name.
    async fn servers_of(&self, user_ids: &[i64]) -> Result<Vec<ServerRow>, StoreError>;
    async fn get_server(
        &self,
        user: &UserName,
        server: &ServerName,
    ) -> Result<Option<ServerRow>, StoreError>;

    async fn request_spawn(&self, req: SpawnRequest) -> Result<SpawnOutcome, StoreError>;
    async fn request_stop(
        &self,
        user: &UserName,
        server: &ServerName,
    ) -> Result<StopOutcome, StoreError>;
    /// Marks the user as being deleted, every live server as stopping, and enqueues
    /// the cleanup job (or returns the one already enqueued).
    async fn request_user_removal(&self, user: &UserName) -> Result<JobRow, StoreError>;
    async fn get_job(&self, id: Uuid) -> Result<Option<JobRow>, StoreError>;

    /// Marks a job running and counts the attempt; `None` when the job has already
    /// ended (a duplicate delivery), so the caller does nothing.
    async fn begin_job(&self, id: Uuid, worker: &str) -> Result<Option<JobRow>, StoreError>;
    async fn finish_job(&self, id: Uuid, outcome: &JobOutcome) -> Result<(), StoreError>;
    /// The queue gave up on a job (it used up its deliveries): the job fails with
    /// `error`, and a server still waiting on it fails too, giving back its place.
    /// False when the job had already ended.
    async fn dead_letter(&self, id: Uuid, error: &str) -> Result<bool, StoreError>;
    /// Counts another try of a running job after a transient failure, keeping its error.
    async fn note_retry(&self, id: Uuid, error: &str) -> Result<(), StoreError>;

    async fn lock_server(&self, server_id: i64) -> Result<Box<dyn ServerLock>, StoreError>;
    async fn server_by_id(&self, server_id: i64) -> Result<Option<ServerRow>, StoreError>;
    /// The servers of a user, for cleanup.
    async fn servers_of_user(&self, user_id: i64) -> Result<Vec<ServerRow>, StoreError>;
    /// `pending_spawn → running` if this job is still the server's spawn; false otherwise.
    async fn mark_running(&self, running: &Running) -> Result<bool, StoreError>;
    /// `pending_spawn → failed` if this job is still the server's spawn.
    async fn mark_spawn_failed(
        &self,
        server_id: i64,
        job_id: Uuid,
        error: &str,
    ) -> Result<bool, StoreError>;
    /// Anything but `pending_spawn` of another job → `stopped`. A stop job passes its
    /// id so that only the stop it belongs to completes.
    async fn mark_stopped(
        &self,
        server_id: i64,
        stop_job: Option<Uuid>,
    ) -> Result<bool, StoreError>;
    /// Deletes the user (and its servers) if this cleanup job is still the one wanted.
    async fn delete_user(&self, user_id: i64, job_id: Uuid) -> Result<bool, StoreError>;
}

/// What a worker records when a server became ready.
#[derive(Debug, Clone)]
pub struct Running {
    pub server_id: i64,
    pub job_id: Uuid,
    pub container_id: String,
    pub url: String,
    pub token_hash: String,
    /// The secret the server accepts from the proxy (kept as it is: the proxy sends it).
    pub proxy_token: String,
    /// The limits the container was started with: bytes of memory, CPUs.
    pub mem_limit: Option<i64>,
    pub cpu_limit: Option<f32>,
    /// Which spawner started it (`docker`, `process`).
    pub spawner: String,
}
