//! Rows of users and servers, and the server state machine.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::accounts::Role;

/// A static query over servers joined with their owner; `$tail` filters and orders.
macro_rules! select_servers {
    ($tail:literal) => {
        concat!(
            "select s.id, s.user_id, u.name as user_name, s.name, s.state, s.image, ",
            "s.spawn_job_id, s.stop_job_id, s.container_id, s.url, s.error, s.requested_at, ",
            "s.started_at, s.stopped_at, s.last_activity, s.warning, s.mem_limit, s.cpu_limit, s.spawner ",
            "from servers s join users u on u.id = s.user_id ",
            $tail
        )
    };
}

text_enum! {
    /// `pending_spawn → running → pending_stop → stopped`, and `failed` from a spawn
    /// that did not become ready. A server in `stopped` or `failed` can be spawned again.
    pub enum ServerState {
        PendingSpawn = "pending_spawn",
        Running = "running",
        PendingStop = "pending_stop",
        Stopped = "stopped",
        Failed = "failed",
    }
}

text_enum! {
    /// An account is `active` until its removal is requested.
    pub enum UserState {
        Active = "active",
        Deleting = "deleting",
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    pub id: i64,
    pub name: String,
    pub role: Role,
    pub state: UserState,
    pub cleanup_job_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub last_activity: Option<DateTime<Utc>>,
    pub email: Option<String>,
    pub password_hash: Option<String>,
    pub active: bool,
}

impl UserRow {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// A server joined with its owner's name.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ServerRow {
    pub id: i64,
    pub user_id: i64,
    pub user_name: String,
    pub name: String,
    pub state: ServerState,
    pub image: Option<String>,
    pub spawn_job_id: Option<Uuid>,
    pub stop_job_id: Option<Uuid>,
    pub container_id: Option<String>,
    pub url: Option<String>,
    pub error: Option<String>,
    pub requested_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub stopped_at: Option<DateTime<Utc>>,
    pub last_activity: Option<DateTime<Utc>>,
    /// Set when the server nears its maximum age: when it will be stopped.
    pub warning: Option<String>,
    /// The spawner that started it (`docker`, `process`); `None` before it ran, or
    /// when it ran before Berth recorded this.
    #[sqlx(default)]
    pub spawner: Option<String>,
}
