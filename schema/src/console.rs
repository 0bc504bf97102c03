//! The operator's side of the store: what the dashboard lists and counts, the
//! actions it takes on jobs (retry, cancel), and spawn progress events.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::{JobKind, JobRow, ServerRow, StoreError, accounts::Page};

/// One step of a spawn, in JupyterHub's progress-event shape.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct SpawnEvent {
    #[serde(skip)]
    pub id: i64,
    #[serde(skip)]
    pub job_id: Uuid,
    pub progress: i16,
    pub message: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ready: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub failed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip)]
    pub created_at: DateTime<Utc>,
}

/// What a worker reports about a spawn it runs.
#[derive(Debug, Clone, Default)]
pub struct ProgressStep {
    pub progress: i16,
    pub message: String,
    pub ready: bool,
    pub failed: bool,
    pub url: Option<String>,
}

impl ProgressStep {
    pub fn at(progress: i16, message: impl Into<String>) -> Self {
        Self {
            progress,
            message: message.into(),
            ..Default::default()
        }
    }

    /// The last event of a spawn that failed.
    pub fn failed(error: &str) -> Self {
        Self {
            progress: 100,
            message: format!("spawn failed: {error}"),
            failed: true,
            ..Default::default()
        }
    }
}

/// The NOTIFY channel that announces a new progress event (payload: the job id).
/// Refuses to cancel a job that has started, or a user's removal (its user is
/// half gone already); both stores check this before they change anything.
pub(crate) fn ensure_cancellable(job: &JobRow) -> Result<(), StoreError> {
    if job.state != "queued" {
        return Err(StoreError::Conflict(format!(
            "the job is {}; only a job that has not started can be cancelled",
            job.state
        )));
    }
    if job.kind() == Some(JobKind::Cleanup) {
        return Err(StoreError::Conflict(
            "a user's removal cannot be cancelled once requested".into(),
        ));
    }
    Ok(())
}

/// The kind of a job that is repeated as it was (the scheduled ones); a user's
/// job is retried through the checks of a new request instead.
pub(crate) fn repeatable_kind(of: &JobRow) -> Result<JobKind, StoreError> {
    of.kind()
        .filter(|k| {
            matches!(
                k,
                JobKind::Cull | JobKind::ExpireSessions | JobKind::Archive
            )
        })
        .ok_or_else(|| StoreError::Conflict(format!("a {} job is not repeated as it was", of.kind)))
}

pub const PROGRESS_CHANNEL: &str = "berth_progress";

/// Which jobs a listing or a bulk action covers; every part is optional.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub kind: Option<String>,
    pub state: Option<String>,
    pub user: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// Which servers a listing shows.
#[derive(Debug, Clone, Default)]
pub struct ServerFilter {
    pub state: Option<String>,
    /// Part of the owner's name.
    pub user: Option<String>,
}

/// How many jobs of a kind are in a state.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobCount {
    pub kind: String,
    pub state: String,
    pub count: i64,
}

/// How many servers are in a state.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StateCount {
    pub state: String,
    pub count: i64,
}

/// A server row with the facts the dashboard shows beside it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ServerListing {
    #[sqlx(flatten)]
    pub server: ServerRow,
    pub mem_limit: Option<i64>,
    pub cpu_limit: Option<f32>,
}

#[async_trait]
pub trait Console: Send + Sync + 'static {
    /// Appends a progress event to a spawn and announces it.
    async fn record_progress(&self, job_id: Uuid, step: &ProgressStep) -> Result<(), StoreError>;
    /// Passes on the id of every job with a new progress event, from any process,
    /// until `shutdown` fires; reconnects after a lost connection.
    async fn relay_progress(
        &self,
        to: tokio::sync::broadcast::Sender<Uuid>,
        shutdown: tokio_util::sync::CancellationToken,
    );
    /// The spawn's events after `after` (an event id), oldest first.
    async fn progress_after(&self, job_id: Uuid, after: i64)
    -> Result<Vec<SpawnEvent>, StoreError>;

    /// Jobs matching `filter`, newest first, and how many match.
    async fn jobs_page(
        &self,
        filter: &JobFilter,
        offset: i64,
        limit: i64,
    ) -> Result<Page<JobRow>, StoreError>;
    /// Ids of jobs matching `filter` (for bulk actions), newest first, at most `limit`.
    async fn job_ids(&self, filter: &JobFilter, limit: i64) -> Result<Vec<Uuid>, StoreError>;
    /// Jobs by kind and state.
    async fn job_counts(&self) -> Result<Vec<JobCount>, StoreError>;
    /// Servers by state.
    async fn server_counts(&self) -> Result<Vec<StateCount>, StoreError>;
    /// Jobs that failed since `since`.
    async fn failures_since(&self, since: DateTime<Utc>) -> Result<i64, StoreError>;
    /// Cancels a job that has not started: a waiting spawn leaves its server
    /// stopped (its place given back), a waiting stop leaves its server running.
    /// Conflict when the job has started or ended, or cannot be undone (a cleanup).
    async fn cancel_job(&self, id: Uuid, by: &str) -> Result<JobRow, StoreError>;
    /// Marks `retry` as the retry of `of`.
    async fn link_retry(&self, retry: Uuid, of: Uuid) -> Result<(), StoreError>;
    /// A new job with the kind, owner and payload of `of` (scheduled kinds only).
    async fn repeat_job(&self, of: &JobRow) -> Result<JobRow, StoreError>;

    async fn servers_page(
        &self,
        filter: &ServerFilter,
        offset: i64,
        limit: i64,
    ) -> Result<Page<ServerListing>, StoreError>;
}
