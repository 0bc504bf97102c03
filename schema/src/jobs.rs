//! Job kinds, states and the message that travels through a queue backend.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Spawn,
    Stop,
    Cleanup,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Spawn => "spawn",
            JobKind::Stop => "stop",
            JobKind::Cleanup => "cleanup",
        }
    }

    /// Spawns wait in their own queue so that a wave of them never delays a stop.
    pub fn queue(self) -> &'static str {
        match self {
            JobKind::Spawn => SPAWN_QUEUE,
            JobKind::Stop | JobKind::Cleanup => CONTROL_QUEUE,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A row of the `jobs` table.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub kind: String,
    pub state: String,
    pub user_name: String,
    pub server_name: Option<String>,
    pub payload: serde_json::Value,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub worker: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl JobRow {
    pub fn kind(&self) -> Option<JobKind> {
        serde_json::from_value(serde_json::Value::String(self.kind.clone())).ok()
    }
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
