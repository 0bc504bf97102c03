//! The Postgres implementation of `Accounts`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    accounts::{
        Accounts, ApiTokenRow, AuditEvent, AuditRow, NewAccount, Page, Role, SsoGrant, ThrottleRule,
    },
    names::UserName,
    pg::PgStore,
    rows::{ServerRow, UserRow},
    store::StoreError,
};

/// Turns a unique violation of `constraint` into a conflict with `message`.
pub trait ResultExt<T> {
    fn on_constraint(
        self,
        constraint: &str,
        message: impl FnOnce() -> String,
    ) -> Result<T, StoreError>;
}

impl<T> ResultExt<T> for Result<T, sqlx::Error> {
    fn on_constraint(
        self,
        constraint: &str,
        message: impl FnOnce() -> String,
    ) -> Result<T, StoreError> {
        self.map_err(|e| match &e {
            sqlx::Error::Database(db) if db.constraint() == Some(constraint) => {
                StoreError::Conflict(message())
            }
            _ => StoreError::Database(e),
        })
    }
}

#[async_trait]
impl Accounts for PgStore {
    async fn register(&self, account: &NewAccount) -> Result<UserRow, StoreError> {
        let name = account.name.clone();
        let email = account.email.clone();
        sqlx::query_as::<_, UserRow>(
            "insert into users (name, email, password_hash, role) values ($1, $2, $3, $4) returning *",
        )
        .bind(account.name.as_str())
        .bind(&account.email)
        .bind(&account.password_hash)
        .bind(account.role.as_str())
        .fetch_one(self.pool())
        .await
        .on_constraint("users_name_key", || format!("user {name:?} already exists"))
        .map_err(|e| match e {
            StoreError::Database(sqlx::Error::Database(db)) if db.constraint() == Some("users_email_key") => {
                StoreError::Conflict(format!("email {:?} is already registered", email.unwrap_or_default()))
            }
            other => other,
        })
    }

    async fn find_login(&self, login: &str) -> Result<Option<UserRow>, StoreError> {
        crate::reads::pg::find_login(self.pool(), login).await
    }

    async fn user_by_id(&self, id: i64) -> Result<Option<UserRow>, StoreError> {
        crate::reads::pg::user_by_id(self.pool(), id).await
    }

    async fn users_page(
        &self,
        search: Option<&str>,
        offset: i64,
        limit: i64,
    ) -> Result<Page<UserRow>, StoreError> {
        let pattern = search.map(like_pattern);
        let items = sqlx::query_as::<_, UserRow>(
            "select * from users where $1::text is null or name like $1 or email ilike $1 \
             order by name offset $2 limit $3",
        )
        .bind(&pattern)
        .bind(offset)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        let total: i64 = sqlx::query_scalar(
            "select count(*) from users where $1::text is null or name like $1 or email ilike $1",
        )
        .bind(&pattern)
        .fetch_one(self.pool())
        .await?;
        Ok(Page { items, total })
    }

    async fn set_role(&self, user: &UserName, role: Role) -> Result<UserRow, StoreError> {
        sqlx::query_as::<_, UserRow>("update users set role = $2 where name = $1 returning *")
            .bind(user.as_str())
            .bind(role.as_str())
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| StoreError::no_user(user))
    }

    async fn set_active(&self, user: &UserName, active: bool) -> Result<UserRow, StoreError> {
        let mut tx = self.pool().begin().await?;
        let row = sqlx::query_as::<_, UserRow>(
            "update users set active = $2 where name = $1 returning *",
        )
        .bind(user.as_str())
        .bind(active)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::no_user(user))?;
        if !active {
            sqlx::query(
                "update sessions set revoked_at = now() where user_id = $1 and revoked_at is null",
            )
            .bind(row.id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(row)
    }

    async fn set_password(
        &self,
        user_id: i64,
        hash: &str,
        keep: Option<Uuid>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("update users set password_hash = $2 where id = $1")
            .bind(user_id)
            .bind(hash)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "update sessions set revoked_at = now() \
             where user_id = $1 and revoked_at is null and ($2::uuid is null or jti <> $2)",
        )
        .bind(user_id)
        .bind(keep)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn bootstrap_admin(
        &self,
        name: &UserName,
        password_hash: &str,
    ) -> Result<UserRow, StoreError> {
        // An existing account keeps its password: configuration never resets one.
        Ok(sqlx::query_as::<_, UserRow>(
            "insert into users (name, password_hash, role) values ($1, $2, 'admin') \
             on conflict (name) do update set role = 'admin', active = true returning *",
        )
        .bind(name.as_str())
        .bind(password_hash)
        .fetch_one(self.pool())
        .await?)
    }

    async fn create_session(
        &self,
        jti: Uuid,
        user_id: i64,
        expires_at: DateTime<Utc>,
        client_addr: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "insert into sessions (jti, user_id, expires_at, client_addr) values ($1, $2, $3, $4)",
        )
        .bind(jti)
        .bind(user_id)
        .bind(expires_at)
        .bind(client_addr)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn session_user(&self, jti: Uuid) -> Result<Option<UserRow>, StoreError> {
        Ok(sqlx::query_as::<_, UserRow>(
            "select u.* from sessions s join users u on u.id = s.user_id \
             where s.jti = $1 and s.revoked_at is null and s.expires_at > now() and u.active",
        )
        .bind(jti)
        .fetch_optional(self.pool())
        .await?)
    }

    async fn revoke_session(&self, jti: Uuid) -> Result<(), StoreError> {
        sqlx::query("update sessions set revoked_at = coalesce(revoked_at, now()) where jti = $1")
            .bind(jti)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn create_api_token(
        &self,
        row: &ApiTokenRow,
        token_hash: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "insert into api_tokens (id, name, token_hash, scopes, created_by, expires_at) \
             values ($1, $2, $3, $4, $5, $6)",
        )
        .bind(row.id)
        .bind(&row.name)
        .bind(token_hash)
        .bind(&row.scopes)
        .bind(&row.created_by)
        .bind(row.expires_at)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn use_api_token(&self, token_hash: &str) -> Result<Option<ApiTokenRow>, StoreError> {
        Ok(sqlx::query_as::<_, ApiTokenRow>(
            "update api_tokens set last_used_at = now() \
             where token_hash = $1 and revoked_at is null and (expires_at is null or expires_at > now()) \
             returning id, name, scopes, created_by, created_at, expires_at, last_used_at, revoked_at",
        )
        .bind(token_hash)
        .fetch_optional(self.pool())
        .await?)
    }

    async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRow>, StoreError> {
        Ok(sqlx::query_as::<_, ApiTokenRow>(
            "select id, name, scopes, created_by, created_at, expires_at, last_used_at, revoked_at \
             from api_tokens order by created_at",
        )
        .fetch_all(self.pool())
        .await?)
    }

    async fn revoke_api_token(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "update api_tokens set revoked_at = now() where id = $1 and revoked_at is null",
        )
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn server_by_token(&self, token_hash: &str) -> Result<Option<ServerRow>, StoreError> {
        crate::reads::pg::server_by_token(self.pool(), token_hash).await
    }

    async fn create_sso(
        &self,
        token_hash: &str,
        user_id: i64,
        server_name: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query("insert into sso_tokens (token_hash, user_id, server_name, expires_at) values ($1, $2, $3, $4)")
            .bind(token_hash)
            .bind(user_id)
            .bind(server_name)
            .bind(expires_at)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn consume_sso(&self, token_hash: &str) -> Result<Option<SsoGrant>, StoreError> {
        // One statement: of two concurrent uses, exactly one sees `used_at is null`.
        Ok(sqlx::query_as::<_, SsoGrant>(
            "update sso_tokens t set used_at = now() from users u \
             where t.token_hash = $1 and t.used_at is null and t.expires_at > now() \
             and u.id = t.user_id and u.active \
             returning u.name as user_name, t.server_name, t.expires_at",
        )
        .bind(token_hash)
        .fetch_optional(self.pool())
        .await?)
    }

    async fn throttled(&self, keys: &[String]) -> Result<Option<i64>, StoreError> {
        let wait: Option<f64> = sqlx::query_scalar(
            "select max(extract(epoch from locked_until - now()))::float8 from login_throttle \
             where key = any($1) and locked_until > now()",
        )
        .bind(keys)
        .fetch_one(self.pool())
        .await?;
        Ok(wait.map(|secs| secs.ceil().max(1.0) as i64))
    }

    async fn record_failure(&self, key: &str, rule: ThrottleRule) -> Result<(), StoreError> {
        // A fixed window per key: failures count from the first one, and reaching the
        // limit locks the key until the window ends.
        sqlx::query(
            "insert into login_throttle as t (key, failures, window_start) values ($1, 1, now()) \
             on conflict (key) do update set \
               failures = case when t.window_start + make_interval(secs => $3) < now() then 1 else t.failures + 1 end, \
               window_start = case when t.window_start + make_interval(secs => $3) < now() then now() else t.window_start end",
        )
        .bind(key)
        .bind(rule.max_failures)
        .bind(rule.window_secs as f64)
        .execute(self.pool())
        .await?;
        sqlx::query(
            "update login_throttle set locked_until = window_start + make_interval(secs => $3) \
             where key = $1 and failures >= $2",
        )
        .bind(key)
        .bind(rule.max_failures)
        .bind(rule.window_secs as f64)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn clear_failures(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query("delete from login_throttle where key = $1")
            .bind(key)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn audit(&self, event: AuditEvent<'_>) -> Result<(), StoreError> {
        sqlx::query("insert into audit_log (actor, action, target, client_addr, detail) values ($1, $2, $3, $4, $5)")
            .bind(event.actor)
            .bind(event.action)
            .bind(event.target)
            .bind(event.client_addr)
            .bind(event.detail)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn audit_page(&self, offset: i64, limit: i64) -> Result<Page<AuditRow>, StoreError> {
        crate::reads::pg::audit_page(self.pool(), offset, limit).await
    }
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
