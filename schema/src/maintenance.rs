//! The scheduler's side of the store: schedules and their ticks, and what the
//! periodic jobs read and remove (idle servers, expired sessions, old rows).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::{JobKind, ServerRow, StoreError};

/// A schedule as registered, with its latest run.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ScheduleView {
    pub name: String,
    pub expression: String,
    pub kind: String,
    pub next_run_at: Option<DateTime<Utc>>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub last_job_id: Option<Uuid>,
    pub last_state: Option<String>,
    pub last_result: Option<serde_json::Value>,
    pub last_error: Option<String>,
    #[serde(skip)]
    pub payload: serde_json::Value,
}

/// The tables archiving moves to files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArchiveTable {
    /// Finished jobs, by `finished_at`.
    Jobs,
    /// The audit log, by `at`.
    AuditLog,
    /// Activity reports, by `recorded_at`.
    ActivityLog,
}

impl ArchiveTable {
    pub const ALL: [ArchiveTable; 3] = [Self::Jobs, Self::AuditLog, Self::ActivityLog];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jobs => "jobs",
            Self::AuditLog => "audit_log",
            Self::ActivityLog => "activity_log",
        }
    }
}

/// What expiring sessions removed.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Expired {
    pub sessions: u64,
    pub sso_tokens: u64,
    pub api_tokens: u64,
    pub login_throttle: u64,
}

#[async_trait]
pub trait Maintenance: Send + Sync + 'static {
    /// Records (or updates) a schedule; true when it was not known before.
    async fn register_schedule(
        &self,
        name: &str,
        expression: &str,
        kind: JobKind,
        payload: &serde_json::Value,
    ) -> Result<bool, StoreError>;
    async fn set_next_run(&self, name: &str, at: Option<DateTime<Utc>>) -> Result<(), StoreError>;
    /// Ticks at or before this need no run: the latest scheduled (not manual) tick
    /// enqueued, or when the schedule was first registered (a new schedule does not
    /// make up ticks from before it existed).
    async fn schedule_baseline(&self, name: &str) -> Result<DateTime<Utc>, StoreError>;
    /// Enqueues the schedule's job for `tick` unless that tick, or a later one, is
    /// already enqueued: a tick runs once, whichever replica gets there first.
    /// Manual runs (an admin's "run now") always enqueue. The job's id, or `None`.
    async fn enqueue_tick(
        &self,
        name: &str,
        tick: DateTime<Utc>,
        manual: bool,
    ) -> Result<Option<Uuid>, StoreError>;
    async fn schedules(&self) -> Result<Vec<ScheduleView>, StoreError>;

    /// Moves the user's and the named servers' last activity forward (never back)
    /// and logs each report; NotFound for an unknown user or server, and then
    /// nothing is written.
    async fn record_activity(
        &self,
        user: &crate::UserName,
        user_at: Option<DateTime<Utc>>,
        servers: &[(crate::ServerName, DateTime<Utc>)],
    ) -> Result<(), StoreError>;
    /// Running servers whose last activity (or start) is before `idle_before`.
    async fn idle_servers(
        &self,
        idle_before: DateTime<Utc>,
        exempt_admins: bool,
    ) -> Result<Vec<ServerRow>, StoreError>;
    /// Warns running servers started before `started_before` that have no warning
    /// yet: they will be stopped at `stop_at`. How many were warned.
    async fn warn_old_servers(
        &self,
        started_before: DateTime<Utc>,
        max_age_secs: i64,
        exempt_admins: bool,
    ) -> Result<u64, StoreError>;
    /// Running servers started before `started_before` and warned before `warned_before`.
    async fn expired_servers(
        &self,
        started_before: DateTime<Utc>,
        warned_before: DateTime<Utc>,
        exempt_admins: bool,
    ) -> Result<Vec<ServerRow>, StoreError>;
    async fn expire_sessions(&self) -> Result<Expired, StoreError>;
    /// Moves rows of `table` older than `before` into gzip JSON-lines files under
    /// `dir` (one per table and day), batch by batch; how many rows it moved.
    async fn archive(
        &self,
        table: ArchiveTable,
        before: DateTime<Utc>,
        dir: &std::path::Path,
    ) -> Result<u64, StoreError>;
    /// Removes the queue backend's own records of jobs finished before `before`.
    async fn purge_queue(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;
    /// Keeps what a job did on its row.
    async fn record_result(&self, job: Uuid, result: &serde_json::Value) -> Result<(), StoreError>;
}
