//! Job kinds, states and the message that travels through a queue backend.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

text_enum! {
    pub enum JobKind {
        Spawn = "spawn",
        Stop = "stop",
        Cleanup = "cleanup",
        /// Stop idle servers and servers past their maximum age (scheduled).
        Cull = "cull",
        /// Remove expired sessions, SSO tokens and revoked tokens (scheduled).
        ExpireSessions = "expire_sessions",
        /// Move old job, audit and activity rows to archive files (scheduled).
        Archive = "archive",
    }
}

impl JobKind {
    /// Spawns wait in their own queue so that a wave of them never delays a stop.
    pub fn queue(self) -> &'static str {
        match self {
            JobKind::Spawn => SPAWN_QUEUE,
            JobKind::Stop
            | JobKind::Cleanup
            | JobKind::Cull
            | JobKind::ExpireSessions
            | JobKind::Archive => CONTROL_QUEUE,
        }
    }
}

pub const SPAWN_QUEUE: &str = "berth.spawn";
pub const CONTROL_QUEUE: &str = "berth.control";

/// What a queue backend carries: only the id. The job's state, payload and history
/// live in the `jobs` table, so every backend shows the same thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEnvelope {
    pub job_id: Uuid,
    pub kind: JobKind,
}

text_enum! {
    pub enum JobState {
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

impl JobState {
    /// Queued or running: not ended yet.
    pub fn is_open(self) -> bool {
        matches!(self, JobState::Queued | JobState::Running)
    }
}

/// The user name recorded on jobs the scheduler enqueues (not a valid user name,
/// so it never collides with one).
pub const SYSTEM_USER: &str = "(scheduler)";

/// Payload of a cull job: the scheduler's settings at the tick.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CullJob {
    /// Servers without activity for this long are stopped.
    pub idle_timeout_secs: i64,
    /// Servers running longer than this are stopped, after a warning; 0: no cap.
    pub max_age_secs: i64,
    /// How long before the maximum age the user is warned.
    pub max_age_warning_secs: i64,
    /// Admins' servers are left alone.
    pub exempt_admins: bool,
}

/// Payload of an archive job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchiveJob {
    pub after_days: i64,
    pub dir: String,
}

/// A row of the `jobs` table.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub kind: JobKind,
    pub state: JobState,
    pub user_name: String,
    /// The account the job is about (a name can be deleted and taken again);
    /// none for the scheduler's jobs.
    pub user_id: Option<i64>,
    pub server_name: Option<String>,
    pub payload: serde_json::Value,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub worker: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub result: Option<serde_json::Value>,
    /// The job this one retries (an operator's retry).
    pub retry_of: Option<Uuid>,
}

/// How a job ended, as a worker reports it.
#[derive(Debug, Clone)]
pub enum JobOutcome {
    Succeeded,
    /// The job became moot (say, a stop arrived before the spawn ran); the reason is kept.
    Cancelled(String),
    Failed(String),
}

/// Payload of a spawn or stop job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerJob {
    pub server_id: i64,
}

/// Payload of a cleanup job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CleanupJob {
    pub user_id: i64,
}
