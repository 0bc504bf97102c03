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
            "s.started_at, s.stopped_at, s.last_activity, s.warning, s.mem_limit, s.cpu_limit, s.spawner, ",
            "s.profile, s.profile_spec, s.idle_timeout_secs, s.max_age_secs ",
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
    /// The groups the account is in, as a JSON list (`groups()` reads it).
    #[sqlx(default)]
    pub groups: Option<String>,
}

impl UserRow {
    /// The groups the account is in, for profiles' rules.
    pub fn groups(&self) -> Vec<String> {
        self.groups
            .as_deref()
            .and_then(|g| serde_json::from_str(g).ok())
            .unwrap_or_default()
    }

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
    /// The profile it was requested with, and that profile's definition then.
    #[sqlx(default)]
    pub profile: Option<String>,
    #[sqlx(default)]
    pub profile_spec: Option<String>,
    /// The profile's culling overrides (seconds); the scheduler's when `None`.
    #[sqlx(default)]
    pub idle_timeout_secs: Option<i64>,
    #[sqlx(default)]
    pub max_age_secs: Option<i64>,
}

impl ServerRow {
    /// The profile as it was when the server was requested.
    pub fn profile_definition(&self) -> Option<crate::profiles::Profile> {
        self.profile_spec
            .as_deref()
            .and_then(|text| crate::profiles::Profile::from_json(text).ok())
    }
}
