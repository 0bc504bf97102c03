//! Accounts: login sessions, service tokens, SSO hand-off, throttling and audit.

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use crate::{
    db::{Db, apply, each, execute, now},
    names::UserName,
    rows::{ServerRow, UserRow},
    store::StoreError,
};

text_enum! {
    pub enum Role {
        User = "user",
        Admin = "admin",
    }
}

#[derive(Debug, Clone)]
pub struct NewAccount {
    pub name: UserName,
    pub email: Option<String>,
    pub password_hash: Option<String>,
    pub role: Role,
}

#[derive(Debug, Clone)]
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
    pub user_id: i64,
    pub user_name: String,
    pub server_name: String,
    pub expires_at: DateTime<Utc>,
    /// The login session that asked for the hand-off, if a user's own did: the
    /// proxy's session it becomes ends with it.
    pub session_jti: Option<Uuid>,
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

/// A login session (the dashboard's cookie or an access token).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionRow {
    pub jti: Uuid,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub client_addr: Option<String>,
}

/// Which audit entries a listing shows: each part narrows it.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Who acted, exactly.
    pub actor: Option<String>,
    /// What they did (`login_failed`, `server_stopped`, …), exactly.
    pub action: Option<String>,
    /// Part of the target (a user, `user/server`, a token's name).
    pub target: Option<String>,
    /// At or after.
    pub since: Option<DateTime<Utc>>,
    /// Before.
    pub until: Option<DateTime<Utc>>,
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
    /// Creates the bootstrap admin when no account has its name; an existing
    /// account is left exactly as it is (never promoted, re-activated or given the
    /// configured password). `None` when it existed.
    async fn bootstrap_admin(
        &self,
        name: &UserName,
        password_hash: &str,
    ) -> Result<Option<UserRow>, StoreError>;

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
    /// The account's sessions that have not expired, newest first (revoked ones
    /// included, with when).
    async fn sessions_of(&self, user_id: i64) -> Result<Vec<SessionRow>, StoreError>;
    /// Ends a session and every proxy session it handed over.
    async fn revoke_session(&self, jti: Uuid) -> Result<(), StoreError>;

    /// A browser session of the proxy, known by the SHA-256 of its cookie; it ends
    /// with `parent` (the login session that made the hand-off), when there is one.
    async fn create_proxy_session(
        &self,
        token_hash: &str,
        user_id: i64,
        expires_at: DateTime<Utc>,
        parent: Option<Uuid>,
        client_addr: Option<&str>,
    ) -> Result<(), StoreError>;
    /// The active account behind a live proxy session.
    async fn proxy_session_user(&self, token_hash: &str) -> Result<Option<UserRow>, StoreError>;
    async fn revoke_proxy_session(&self, token_hash: &str) -> Result<(), StoreError>;

    async fn create_api_token(&self, row: &ApiTokenRow, token_hash: &str)
    -> Result<(), StoreError>;
    /// A live (not revoked, not expired) token by its hash; records its use, to
    /// the minute (a write for every request would make each one wait for a commit).
    async fn use_api_token(&self, token_hash: &str) -> Result<Option<ApiTokenRow>, StoreError>;
    async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRow>, StoreError>;
    /// Revokes a token; false when there is no such live token.
    async fn revoke_api_token(&self, id: Uuid) -> Result<bool, StoreError>;

    /// A running server by the hash of its own token.
    async fn server_by_token(&self, token_hash: &str) -> Result<Option<ServerRow>, StoreError>;
    /// A hand-off token for the user's server; `session` is the login session that
    /// asked for it (none for a service token).
    async fn create_sso(
        &self,
        token_hash: &str,
        user_id: i64,
        server_name: &str,
        expires_at: DateTime<Utc>,
        session: Option<Uuid>,
    ) -> Result<(), StoreError>;
    /// Marks an SSO token used and returns whose it is; `None` if it is unknown,
    /// expired or used, if its server is not running, or if `for_server` (the
    /// calling server's id) is another server: all checked in the statement that
    /// spends it, so a refused use leaves the token as it was.
    async fn consume_sso(
        &self,
        token_hash: &str,
        for_server: Option<i64>,
    ) -> Result<Option<SsoGrant>, StoreError>;

    /// Counts an attempt against each key before its password is checked, in one
    /// transaction; the seconds until the most locked key may try again when any
    /// is past its limit (that attempt is not to be checked). Check-then-count let
    /// a burst of concurrent guesses all be checked.
    async fn reserve_attempt(
        &self,
        keys: &[(&str, ThrottleRule)],
    ) -> Result<Option<i64>, StoreError>;
    /// Gives back one attempt of `key` (it succeeded).
    async fn release_attempt(&self, key: &str) -> Result<(), StoreError>;
    /// Forgets a key's attempts (its account logged in).
    async fn clear_failures(&self, key: &str) -> Result<(), StoreError>;

    async fn audit(&self, event: AuditEvent<'_>) -> Result<(), StoreError>;
    /// The entries `filter` picks, newest first.
    async fn audit_page(
        &self,
        filter: &AuditFilter,
        offset: i64,
        limit: i64,
    ) -> Result<Page<AuditRow>, StoreError>;
}

/// `AuditFilter` in SQL both dialects run; the target contains `$3` when taking
/// `$3` out of it changes it (neither `strpos` nor `instr` is on both sides, and
/// `like` would read `%` and `_` in the search as wildcards).
const AUDIT_FILTER: &str = "($1 is null or actor = $1) and ($2 is null or action = $2) \
     and ($3 is null or replace(coalesce(target, ''), $3, '') <> coalesce(target, '')) \
     and ($4 is null or at >= $4) and ($5 is null or at < $5)";

/// Binds an `AuditFilter` to `AUDIT_FILTER`'s five parameters.
macro_rules! audit_filter {
    ($query:expr, $f:expr) => {
        $query
            .bind(&$f.actor)
            .bind(&$f.action)
            .bind(&$f.target)
            .bind($f.since)
            .bind($f.until)
    };
}

/// An API token as stored: its scopes are a JSON array.
#[derive(sqlx::FromRow)]
struct TokenRow {
    id: Uuid,
    name: String,
    scopes: Json<Vec<String>>,
    created_by: Option<String>,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

impl From<TokenRow> for ApiTokenRow {
    fn from(t: TokenRow) -> Self {
        ApiTokenRow {
            id: t.id,
            name: t.name,
            scopes: t.scopes.0,
            created_by: t.created_by,
            created_at: t.created_at,
            expires_at: t.expires_at,
            last_used_at: t.last_used_at,
            revoked_at: t.revoked_at,
        }
    }
}

/// How often a token's last use is written down.
const USE_RECORDED_EVERY: TimeDelta = TimeDelta::minutes(1);

macro_rules! token_columns {
    () => {
        "id, name, scopes, created_by, created_at, expires_at, last_used_at, revoked_at"
    };
}

/// A `like` pattern that matches `part` anywhere, its wildcards taken literally.
pub(crate) fn like_pattern(part: &str) -> String {
    format!(
        "%{}%",
        part.replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    )
}

/// Whether `e` violates the unique constraint that Postgres names `constraint`
/// (SQLite names the index, or the table and column, in its message: `sqlite`).
fn violates(e: &sqlx::Error, constraint: &str, sqlite: &str) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation()
        && (db.constraint() == Some(constraint) || db.message().contains(sqlite)))
}

/// Inserts an account (in `groups`); a taken name or email is a conflict that
/// says which.
pub(crate) async fn insert_account(
    tx: &mut crate::db::Tx,
    account: &NewAccount,
    groups: &[String],
) -> Result<UserRow, StoreError> {
    each!(tx.conn(), c => sqlx::query_as::<_, UserRow>(
        "insert into users (name, email, password_hash, role, groups, created_at) \
         values ($1, $2, $3, $4, $5, $6) returning *",
    )
    .bind(account.name.as_str())
    .bind(&account.email)
    .bind(&account.password_hash)
    .bind(account.role.as_str())
    .bind(crate::db::json_list(groups))
    .bind(now())
    .fetch_one(c)
    .await)
    .map_err(|e| {
        if violates(&e, "users_name_key", "users.name") {
            StoreError::Conflict(format!("user {:?} already exists", account.name))
        } else if violates(&e, "users_email_key", "users_email_key") {
            StoreError::Conflict(format!(
                "email {:?} is already registered",
                account.email.clone().unwrap_or_default()
            ))
        } else {
            StoreError::Database(e)
        }
    })
}

/// Users whose name or email contains `$1` (all when it is null).
macro_rules! user_search {
    () => {
        "from users where $1 is null or name like $1 escape '\\' or lower(email) like lower($1) escape '\\'"
    };
}

#[async_trait]
impl Accounts for Db {
    async fn register(&self, account: &NewAccount) -> Result<UserRow, StoreError> {
        self.write(async |tx| insert_account(tx, account, &[]).await)
            .await
    }

    async fn find_login(&self, login: &str) -> Result<Option<UserRow>, StoreError> {
        // By name, or by email (any case) when the login has an `@`.
        let sql = if login.contains('@') {
            "select * from users where lower(email) = lower($1)"
        } else {
            "select * from users where name = $1"
        };
        Ok(each!(self.pool(), p => sqlx::query_as::<_, UserRow>(sql)
            .bind(login)
            .fetch_optional(p)
            .await)?)
    }

    async fn user_by_id(&self, id: i64) -> Result<Option<UserRow>, StoreError> {
        Ok(
            each!(self.pool(), p => sqlx::query_as::<_, UserRow>("select * from users where id = $1")
            .bind(id)
            .fetch_optional(p)
            .await)?,
        )
    }

    async fn users_page(
        &self,
        search: Option<&str>,
        offset: i64,
        limit: i64,
    ) -> Result<Page<UserRow>, StoreError> {
        let pattern = search.map(like_pattern);
        each!(self.pool(), p => {
            let items = sqlx::query_as::<_, UserRow>(concat!(
                "select * ", user_search!(), " order by name limit $3 offset $2"
            ))
            .bind(&pattern)
            .bind(offset)
            .bind(limit)
            .fetch_all(p)
            .await?;
            let total: i64 = sqlx::query_scalar(concat!("select count(*) ", user_search!()))
                .bind(&pattern)
                .fetch_one(p)
                .await?;
            Ok(Page { items, total })
        })
    }

    async fn set_role(&self, user: &UserName, role: Role) -> Result<UserRow, StoreError> {
        self.write(async |tx| {
            each!(tx.conn(), c => sqlx::query_as::<_, UserRow>(
                "update users set role = $2 where name = $1 returning *",
            )
            .bind(user.as_str())
            .bind(role.as_str())
            .fetch_optional(c)
            .await)?
            .ok_or_else(|| StoreError::no_user(user))
        })
        .await
    }

    async fn set_active(&self, user: &UserName, active: bool) -> Result<UserRow, StoreError> {
        self.write(async |tx| {
            let row = each!(tx.conn(), c => sqlx::query_as::<_, UserRow>(
                "update users set active = $2 where name = $1 returning *",
            )
            .bind(user.as_str())
            .bind(active)
            .fetch_optional(c)
            .await)?
            .ok_or_else(|| StoreError::no_user(user))?;
            if !active {
                revoke_sessions(tx, row.id, None).await?;
            }
            Ok(row)
        })
        .await
    }

    async fn set_password(
        &self,
        user_id: i64,
        hash: &str,
        keep: Option<Uuid>,
    ) -> Result<(), StoreError> {
        self.write(async |tx| {
            execute!(
                tx.conn(),
                "update users set password_hash = $2 where id = $1",
                user_id,
                hash
            )?;
            revoke_sessions(tx, user_id, keep).await
        })
        .await
    }

    async fn bootstrap_admin(
        &self,
        name: &UserName,
        password_hash: &str,
    ) -> Result<Option<UserRow>, StoreError> {
        self.write(async |tx| {
            Ok(each!(tx.conn(), c => sqlx::query_as::<_, UserRow>(
                "insert into users (name, password_hash, role, created_at) \
                 values ($1, $2, 'admin', $3) on conflict (name) do nothing returning *",
            )
            .bind(name.as_str())
            .bind(password_hash)
            .bind(now())
            .fetch_optional(c)
            .await)?)
        })
        .await
    }

    async fn create_session(
        &self,
        jti: Uuid,
        user_id: i64,
        expires_at: DateTime<Utc>,
        client_addr: Option<&str>,
    ) -> Result<(), StoreError> {
        apply!(
            self,
            "insert into sessions (jti, user_id, issued_at, expires_at, client_addr) \
                 values ($1, $2, $5, $3, $4)",
            jti,
            user_id,
            expires_at,
            client_addr,
            now()
        )
        .map(drop)
    }

    async fn session_user(&self, jti: Uuid) -> Result<Option<UserRow>, StoreError> {
        Ok(each!(self.pool(), p => sqlx::query_as::<_, UserRow>(
            "select u.* from sessions s join users u on u.id = s.user_id \
             where s.jti = $1 and s.revoked_at is null and s.expires_at > $2 and u.active",
        )
        .bind(jti)
        .bind(now())
        .fetch_optional(p)
        .await)?)
    }

    async fn sessions_of(&self, user_id: i64) -> Result<Vec<SessionRow>, StoreError> {
        Ok(each!(self.pool(), p => sqlx::query_as::<_, SessionRow>(
            "select jti, issued_at, expires_at, revoked_at, client_addr from sessions \
             where user_id = $1 and expires_at > $2 order by issued_at desc limit 100",
        )
        .bind(user_id)
        .bind(now())
        .fetch_all(p)
        .await)?)
    }

    async fn revoke_session(&self, jti: Uuid) -> Result<(), StoreError> {
        apply!(
            self,
            "update sessions set revoked_at = coalesce(revoked_at, $2) \
             where jti = $1 or parent_jti = $1",
            jti,
            now()
        )
        .map(drop)
    }

    async fn create_proxy_session(
        &self,
        token_hash: &str,
        user_id: i64,
        expires_at: DateTime<Utc>,
        parent: Option<Uuid>,
        client_addr: Option<&str>,
    ) -> Result<(), StoreError> {
        apply!(
            self,
            "insert into sessions \
               (jti, user_id, issued_at, expires_at, client_addr, token_hash, parent_jti) \
             values ($1, $2, $3, $4, $5, $6, $7)",
            Uuid::now_v7(),
            user_id,
            now(),
            expires_at,
            client_addr,
            token_hash,
            parent
        )
        .map(drop)
    }

    async fn proxy_session_user(&self, token_hash: &str) -> Result<Option<UserRow>, StoreError> {
        let user = each!(self.pool(), p => sqlx::query_as::<_, UserRow>(
            "select u.* from sessions s join users u on u.id = s.user_id \
             where s.token_hash = $1 and s.revoked_at is null and s.expires_at > $2 and u.active",
        )
        .bind(token_hash)
        .bind(now())
        .fetch_optional(p)
        .await)?;
        Ok(user)
    }

    async fn revoke_proxy_session(&self, token_hash: &str) -> Result<(), StoreError> {
        apply!(
            self,
            "update sessions set revoked_at = coalesce(revoked_at, $2) where token_hash = $1",
            token_hash,
            now()
        )
        .map(drop)
    }

    async fn create_api_token(
        &self,
        row: &ApiTokenRow,
        token_hash: &str,
    ) -> Result<(), StoreError> {
        apply!(
            self,
            "insert into api_tokens \
               (id, name, token_hash, scopes, created_by, expires_at, created_at) \
             values ($1, $2, $3, $4, $5, $6, $7)",
            row.id,
            &row.name,
            token_hash,
            Json(&row.scopes),
            &row.created_by,
            row.expires_at,
            now()
        )
        .map(drop)
    }

    async fn use_api_token(&self, token_hash: &str) -> Result<Option<ApiTokenRow>, StoreError> {
        let at = now();
        let live = each!(self.pool(), p => sqlx::query_as::<_, TokenRow>(concat!(
            "select ",
            token_columns!(),
            " from api_tokens where token_hash = $1 and revoked_at is null \
             and (expires_at is null or expires_at > $2)"
        ))
        .bind(token_hash)
        .bind(at)
        .fetch_optional(p)
        .await)?;
        let Some(mut row) = live else {
            return Ok(None);
        };
        if row
            .last_used_at
            .is_none_or(|used| at - used >= USE_RECORDED_EVERY)
        {
            apply!(
                self,
                "update api_tokens set last_used_at = $2 where token_hash = $1",
                token_hash,
                at
            )?;
            row.last_used_at = Some(at);
        }
        Ok(Some(row.into()))
    }

    async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRow>, StoreError> {
        let rows = each!(self.pool(), p => sqlx::query_as::<_, TokenRow>(concat!(
            "select ", token_columns!(), " from api_tokens order by created_at"
        ))
        .fetch_all(p)
        .await)?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn revoke_api_token(&self, id: Uuid) -> Result<bool, StoreError> {
        self.write(async |tx| {
            Ok(execute!(
                tx.conn(),
                "update api_tokens set revoked_at = $2 where id = $1 and revoked_at is null",
                id,
                now()
            )? == 1)
        })
        .await
    }

    async fn server_by_token(&self, token_hash: &str) -> Result<Option<ServerRow>, StoreError> {
        Ok(
            each!(self.pool(), p => sqlx::query_as::<_, ServerRow>(select_servers!(
            "where s.token_hash = $1 and s.state = 'running'"
        ))
        .bind(token_hash)
        .fetch_optional(p)
        .await)?,
        )
    }

    async fn create_sso(
        &self,
        token_hash: &str,
        user_id: i64,
        server_name: &str,
        expires_at: DateTime<Utc>,
        session: Option<Uuid>,
    ) -> Result<(), StoreError> {
        apply!(
            self,
            "insert into sso_tokens \
               (token_hash, user_id, server_name, expires_at, created_at, session_jti) \
             values ($1, $2, $3, $4, $5, $6)",
            token_hash,
            user_id,
            server_name,
            expires_at,
            now(),
            session
        )
        .map(drop)
    }

    async fn consume_sso(
        &self,
        token_hash: &str,
        for_server: Option<i64>,
    ) -> Result<Option<SsoGrant>, StoreError> {
        // One statement: of two concurrent uses, exactly one sees `used_at is null`.
        self.write(async |tx| {
            Ok(each!(tx.conn(), c => sqlx::query_as::<_, SsoGrant>(
                "update sso_tokens set used_at = $2 \
                 where token_hash = $1 and used_at is null and expires_at > $2 \
                 and exists (select 1 from users u where u.id = user_id and u.active) \
                 and exists (select 1 from servers s where s.user_id = sso_tokens.user_id \
                   and s.name = sso_tokens.server_name and s.state = 'running' \
                   and ($3 is null or s.id = $3)) \
                 returning user_id, (select name from users u where u.id = user_id) as user_name, \
                   server_name, expires_at, session_jti",
            )
            .bind(token_hash)
            .bind(now())
            .bind(for_server)
            .fetch_optional(c)
            .await)?)
        })
        .await
    }

    async fn reserve_attempt(
        &self,
        keys: &[(&str, ThrottleRule)],
    ) -> Result<Option<i64>, StoreError> {
        // A fixed window per key: attempts count from the first one, and one past
        // the limit locks the key until the window ends. One upsert per key, so
        // concurrent attempts each see the count their own made.
        let at = now();
        self.write(async |tx| {
            let mut until: Option<DateTime<Utc>> = None;
            for (key, rule) in keys {
                let window = TimeDelta::seconds(rule.window_secs);
                let (attempts, start, locked): (i32, DateTime<Utc>, Option<DateTime<Utc>>) =
                    each!(tx.conn(), c => sqlx::query_as(
                        "insert into login_throttle as t (key, failures, window_start) \
                         values ($1, 1, $2) \
                         on conflict (key) do update set \
                           failures = case when t.window_start < $3 then 1 else t.failures + 1 end, \
                           window_start = case when t.window_start < $3 then $2 else t.window_start end, \
                           locked_until = case when t.window_start < $3 then null else t.locked_until end \
                         returning failures, window_start, locked_until",
                    )
                    .bind(key)
                    .bind(at)
                    .bind(at - window)
                    .fetch_one(c)
                    .await)?;
                let locked = match locked {
                    Some(locked) if locked > at => Some(locked),
                    _ if attempts > rule.max_failures => {
                        execute!(
                            tx.conn(),
                            "update login_throttle set locked_until = $2 where key = $1",
                            key,
                            start + window
                        )?;
                        Some(start + window)
                    }
                    _ => None,
                };
                until = until.max(locked);
            }
            Ok(until.map(|u| {
                let secs = (u - at).num_milliseconds() as f64 / 1000.0;
                secs.ceil().max(1.0) as i64
            }))
        })
        .await
    }

    async fn release_attempt(&self, key: &str) -> Result<(), StoreError> {
        apply!(
            self,
            "update login_throttle set failures = case when failures > 0 then failures - 1 else 0 end \
             where key = $1",
            key
        )
        .map(drop)
    }

    async fn clear_failures(&self, key: &str) -> Result<(), StoreError> {
        apply!(self, "delete from login_throttle where key = $1", key).map(drop)
    }

    async fn audit(&self, event: AuditEvent<'_>) -> Result<(), StoreError> {
        apply!(
            self,
            "insert into audit_log (actor, action, target, client_addr, detail, at) \
                 values ($1, $2, $3, $4, $5, $6)",
            event.actor,
            event.action,
            event.target,
            event.client_addr,
            event.detail,
            now()
        )
        .map(drop)
    }

    async fn audit_page(
        &self,
        filter: &AuditFilter,
        offset: i64,
        limit: i64,
    ) -> Result<Page<AuditRow>, StoreError> {
        let f = filter;
        let items = each!(self.pool(), p => audit_filter!(
            sqlx::query_as::<_, AuditRow>(sqlx::AssertSqlSafe(format!(
                "select * from audit_log where {AUDIT_FILTER} order by id desc limit $7 offset $6"
            ))),
            f
        )
        .bind(offset)
        .bind(limit)
        .fetch_all(p)
        .await)?;
        let total = each!(self.pool(), p => audit_filter!(
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "select count(*) from audit_log where {AUDIT_FILTER}"
            ))),
            f
        )
        .fetch_one(p)
        .await)?;
        Ok(Page { items, total })
    }
}

/// Ends the user's open sessions, but `keep`.
async fn revoke_sessions(
    tx: &mut crate::db::Tx,
    user_id: i64,
    keep: Option<Uuid>,
) -> Result<(), StoreError> {
    execute!(
        tx.conn(),
        "update sessions set revoked_at = $3 \
         where user_id = $1 and revoked_at is null and ($2 is null or jti <> $2)",
        user_id,
        keep,
        now()
    )?;
    Ok(())
}
