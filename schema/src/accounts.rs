//! Accounts: login sessions, service tokens, SSO hand-off, throttling and audit.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    names::UserName,
    rows::{ServerRow, UserRow},
    store::StoreError,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Admin,
}

impl Role {
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "user" => Some(Self::User),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewAccount {
    pub name: UserName,
    pub email: Option<String>,
    pub password_hash: Option<String>,
    pub role: Role,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiTokenRow {
    pub id: Uuid,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SsoGrant {
    pub user_name: String,
    pub server_name: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub client_addr: Option<String>,
    pub detail: serde_json::Value,
}

/// A security event for the audit log.
#[derive(Debug, Clone)]
pub struct AuditEvent<'a> {
    pub actor: Option<&'a str>,
    pub action: &'a str,
    pub target: Option<&'a str>,
    pub client_addr: Option<&'a str>,
    pub detail: serde_json::Value,
}

/// How many failed logins a key may have in a window before it is locked out.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleRule {
    pub max_failures: i32,
    pub window_secs: i64,
}

/// One page of a listing.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: i64,
}

#[async_trait]
pub trait Accounts: Send + Sync + 'static {
    /// Creates an account; a taken name or email is a conflict.
    async fn register(&self, account: &NewAccount) -> Result<UserRow, StoreError>;
    /// Finds an account by name, or by email when `login` has an `@`.
    async fn find_login(&self, login: &str) -> Result<Option<UserRow>, StoreError>;
    async fn user_by_id(&self, id: i64) -> Result<Option<UserRow>, StoreError>;
    async fn users_page(
        &self,
        search: Option<&str>,
        offset: i64,
        limit: i64,
    ) -> Result<Page<UserRow>, StoreError>;
    async fn set_role(&self, user: &UserName, role: Role) -> Result<UserRow, StoreError>;
    /// Deactivating an account also revokes its sessions.
    async fn set_active(&self, user: &UserName, active: bool) -> Result<UserRow, StoreError>;
    /// Sets the password and revokes every session but `keep`.
    async fn set_password(
        &self,
        user_id: i64,
        hash: &str,
        keep: Option<Uuid>,
    ) -> Result<(), StoreError>;
    /// Creates the bootstrap admin, or makes an existing account of that name admin.
    async fn bootstrap_admin(
        &self,
        name: &UserName,
        password_hash: &str,
    ) -> Result<UserRow, StoreError>;

    async fn create_session(
        &self,
        jti: Uuid,
        user_id: i64,
        expires_at: DateTime<Utc>,
        client_addr: Option<&str>,
    ) -> Result<(), StoreError>;
    /// The active account behind a session that exists, is not revoked and has not
    /// expired; `None` otherwise. Roles are read here, so a demotion acts at once.
    async fn session_user(&self, jti: Uuid) -> Result<Option<UserRow>, StoreError>;
    async fn revoke_session(&self, jti: Uuid) -> Result<(), StoreError>;

    async fn create_api_token(&self, row: &ApiTokenRow, token_hash: &str)
    -> Result<(), StoreError>;
    /// A live (not revoked, not expired) token by its hash; records its use.
    async fn use_api_token(&self, token_hash: &str) -> Result<Option<ApiTokenRow>, StoreError>;
    async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRow>, StoreError>;
    /// Revokes a token; false when there is no such live token.
    async fn revoke_api_token(&self, id: Uuid) -> Result<bool, StoreError>;

    /// A running server by the hash of its own token.
    async fn server_by_token(&self, token_hash: &str) -> Result<Option<ServerRow>, StoreError>;
    async fn create_sso(
        &self,
        token_hash: &str,
        user_id: i64,
        server_name: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Marks an SSO token used and returns whose it is; `None` if unknown, expired or used.
    async fn consume_sso(&self, token_hash: &str) -> Result<Option<SsoGrant>, StoreError>;

    /// Seconds until the most locked of `keys` may try again, if any is locked.
    async fn throttled(&self, keys: &[String]) -> Result<Option<i64>, StoreError>;
    async fn record_failure(&self, key: &str, rule: ThrottleRule) -> Result<(), StoreError>;
    async fn clear_failures(&self, key: &str) -> Result<(), StoreError>;

    async fn audit(&self, event: AuditEvent<'_>) -> Result<(), StoreError>;
    async fn audit_page(&self, offset: i64, limit: i64) -> Result<Page<AuditRow>, StoreError>;
}
