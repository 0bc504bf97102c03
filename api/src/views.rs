//! The JSON shapes the API answers with.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schema::{
    JobKind, JobRow, JobState, Role, ServerName, ServerRow, ServerState, UserName, UserRow,
    UserState, server_path,
};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

/// How servers' addresses are shown to one caller: each through the proxy at
/// `origin`, and the internal one (bridge IP or loopback port) to admins only.
#[derive(Debug, Clone, Copy)]
pub struct Addresses<'a> {
    pub origin: &'a str,
    pub internal: bool,
}

impl Addresses<'_> {
    /// The server's address through the proxy.
    pub fn public(&self, user: &str, server: &str) -> String {
        match (UserName::parse(user), ServerName::parse_or_default(server)) {
            (Ok(user), Ok(server)) => format!("{}{}", self.origin, server_path(&user, &server)),
            _ => String::new(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ServerView {
    pub name: String,
    pub state: ServerState,
    pub ready: bool,
    /// `spawn` or `stop` while a job is pending, as JupyterHub reports it.
    pub pending: Option<&'static str>,
    /// Where the user reaches the server: through the proxy.
    pub url: Option<String>,
    /// Where the proxy reaches it (admins only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub internal_url: Option<String>,
    /// What started it, `docker` or `process` (admins only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spawner: Option<String>,
    pub image: Option<String>,
    /// The profile it was requested with; none: the platform's settings.
    pub profile: Option<String>,
    pub started: Option<DateTime<Utc>>,
    pub last_activity: Option<DateTime<Utc>>,
    pub error: Option<String>,
    /// When the server nears its maximum age: when it will be stopped.
    pub warning: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<Uuid>,
}

impl ServerView {
    pub fn from_row(row: &ServerRow, seen: Addresses<'_>) -> Self {
        let state = row.state;
        Self {
            name: row.name.clone(),
            state,
            ready: state == ServerState::Running,
            pending: match state {
                ServerState::PendingSpawn => Some("spawn"),
                ServerState::PendingStop => Some("stop"),
                _ => None,
            },
            url: Some(seen.public(&row.user_name, &row.name)),
            internal_url: row.url.clone().filter(|_| seen.internal),
            spawner: row.spawner.clone().filter(|_| seen.internal),
            image: row
                .image
                .clone()
                .or_else(|| row.profile_definition().and_then(|p| p.image)),
            profile: row.profile.clone(),
            started: row.started_at,
            last_activity: row.last_activity,
            error: row.error.clone(),
            warning: row.warning.clone(),
            job_id: None,
        }
    }

    /// The view with the job that is working on the server.
    pub fn with_job(row: &ServerRow, seen: Addresses<'_>) -> Self {
        let mut view = Self::from_row(row, seen);
        view.job_id = match row.state {
            ServerState::PendingStop => row.stop_job_id,
            _ => row.spawn_job_id,
        };
        view
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    pub name: String,
    pub email: Option<String>,
    /// `user` or `admin`.
    pub role: Role,
    pub admin: bool,
    /// False once an admin deactivated the account.
    pub active: bool,
    /// `active`, or `deleting` while the cleanup job runs.
    pub state: UserState,
    pub created: DateTime<Utc>,
    pub last_activity: Option<DateTime<Utc>>,
    /// Groups, for the profiles they may use.
    pub groups: Vec<String>,
    /// The user's servers by name; `""` is the default server.
    pub servers: BTreeMap<String, ServerView>,
}

impl UserView {
    pub fn new(user: &UserRow, servers: &[ServerRow], seen: Addresses<'_>) -> Self {
        Self {
            name: user.name.clone(),
            email: user.email.clone(),
            role: user.role,
            admin: user.is_admin(),
            active: user.active,
            state: user.state,
            created: user.created_at,
            groups: user.groups(),
            last_activity: user.last_activity,
            servers: servers
                .iter()
                .filter(|s| s.user_id == user.id)
                .map(|s| (s.name.clone(), ServerView::from_row(s, seen)))
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: Uuid,
    pub kind: JobKind,
    pub state: JobState,
    pub user: String,
    pub server: Option<String>,
    pub attempts: i32,
    pub created: DateTime<Utc>,
    pub started: Option<DateTime<Utc>>,
    pub finished: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub worker: Option<String>,
    /// What a maintenance job did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The job this one retries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<Uuid>,
}

impl From<JobRow> for JobView {
    fn from(j: JobRow) -> Self {
        Self {
            id: j.id,
            kind: j.kind,
            state: j.state,
            user: j.user_name,
            server: j.server_name,
            attempts: j.attempts,
            created: j.created_at,
            started: j.started_at,
            finished: j.finished_at,
            last_error: j.last_error,
            worker: j.worker,
            result: j.result,
            retry_of: j.retry_of,
        }
    }
}
