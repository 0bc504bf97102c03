//! `Accounts` on SQLite.

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::{SqliteStore, is_unique, json_list, now};
use crate::{
    accounts::{
        Accounts, ApiTokenRow, AuditEvent, AuditRow, NewAccount, Page, Role, SsoGrant, ThrottleRule,
    },
    names::UserName,
    pg_accounts::like_pattern,
    rows::{ServerRow, UserRow},
    store::StoreError,
};

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

const TOKEN_COLUMNS: &str =
    "id, name, scopes, created_by, created_at, expires_at, last_used_at, revoked_at";

#[async_trait]
impl Accounts for SqliteStore {
    async fn register(&self, account: &NewAccount) -> Result<UserRow, StoreError> {
        let mut tx = self.write().await?;
        let row = sqlx::query_as::<_, UserRow>(
            "insert into users (name, email, password_hash, role, created_at) \
             values ($1, $2, $3, $4, $5) returning *",
        )
        .bind(account.name.as_str())
        .bind(&account.email)
        .bind(&account.password_hash)
        .bind(account.role.as_str())
        .bind(now())
        .fetch_one(&mut *tx.tx)
        .await
        .map_err(|e| {
            if is_unique(&e, "users.name") {
                StoreError::Conflict(format!("user {:?} already exists", account.name))
            } else if is_unique(&e, "users_email_key") {
                StoreError::Conflict(format!(
                    "email {:?} is already registered",
                    account.email.clone().unwrap_or_default()
                ))
            } else {
                StoreError::Database(e)
            }
        })?;
        self.commit(tx).await?;
        Ok(row)
    }

    async fn find_login(&self, login: &str) -> Result<Option<UserRow>, StoreError> {
        crate::reads::lite::find_login(self.pool(), login).await
    }

    async fn user_by_id(&self, id: i64) -> Result<Option<UserRow>, StoreError> {
        crate::reads::lite::user_by_id(self.pool(), id).await
    }

    async fn users_page(
        &self,
        search: Option<&str>,
        offset: i64,
        limit: i64,
    ) -> Result<Page<UserRow>, StoreError> {
        let pattern = search.map(like_pattern);
        let filter = "$1 is null or name like $1 escape '\\' or email like $1 escape '\\'";
        let items = sqlx::query_as::<_, UserRow>(sqlx::AssertSqlSafe(format!(
            "select * from users where {filter} order by name limit $3 offset $2"
        )))
        .bind(&pattern)
        .bind(offset)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select count(*) from users where {filter}"
        )))
        .bind(&pattern)
        .fetch_one(self.pool())
        .await?;
        Ok(Page { items, total })
    }

    async fn set_role(&self, user: &UserName, role: Role) -> Result<UserRow, StoreError> {
        let mut tx = self.write().await?;
        let row =
            sqlx::query_as::<_, UserRow>("update users set role = $2 where name = $1 returning *")
                .bind(user.as_str())
                .bind(role.as_str())
                .fetch_optional(&mut *tx.tx)
                .await?
                .ok_or_else(|| StoreError::no_user(user))?;
        self.commit(tx).await?;
        Ok(row)
    }

    async fn set_active(&self, user: &UserName, active: bool) -> Result<UserRow, StoreError> {
        let mut tx = self.write().await?;
        let row = sqlx::query_as::<_, UserRow>(
            "update users set active = $2 where name = $1 returning *",
        )
        .bind(user.as_str())
        .bind(active)
        .fetch_optional(&mut *tx.tx)
        .await?
        .ok_or_else(|| StoreError::no_user(user))?;
        if !active {
            sqlx::query(
                "update sessions set revoked_at = $2 where user_id = $1 and revoked_at is null",
            )
            .bind(row.id)
            .bind(now())
            .execute(&mut *tx.tx)
            .await?;
        }
        self.commit(tx).await?;
        Ok(row)
    }

    async fn set_password(
        &self,
        user_id: i64,
        hash: &str,
        keep: Option<Uuid>,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query("update users set password_hash = $2 where id = $1")
            .bind(user_id)
            .bind(hash)
            .execute(&mut *tx.tx)
            .await?;
        sqlx::query(
            "update sessions set revoked_at = $3 \
             where user_id = $1 and revoked_at is null and ($2 is null or jti <> $2)",
        )
        .bind(user_id)
        .bind(keep)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        self.commit(tx).await
    }

    async fn bootstrap_admin(
        &self,
        name: &UserName,
        password_hash: &str,
    ) -> Result<UserRow, StoreError> {
        let mut tx = self.write().await?;
        let row = sqlx::query_as::<_, UserRow>(
            "insert into users (name, password_hash, role, created_at) values ($1, $2, 'admin', $3) \
             on conflict (name) do update set role = 'admin', active = 1 returning *",
        )
        .bind(name.as_str())
        .bind(password_hash)
        .bind(now())
        .fetch_one(&mut *tx.tx)
        .await?;
        self.commit(tx).await?;
        Ok(row)
    }

    async fn create_session(
        &self,
        jti: Uuid,
        user_id: i64,
        expires_at: DateTime<Utc>,
        client_addr: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "insert into sessions (jti, user_id, issued_at, expires_at, client_addr) \
             values ($1, $2, $5, $3, $4)",
        )
        .bind(jti)
        .bind(user_id)
        .bind(expires_at)
        .bind(client_addr)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        self.commit(tx).await
    }

    async fn session_user(&self, jti: Uuid) -> Result<Option<UserRow>, StoreError> {
        Ok(sqlx::query_as::<_, UserRow>(
            "select u.* from sessions s join users u on u.id = s.user_id \
             where s.jti = $1 and s.revoked_at is null and s.expires_at > $2 and u.active",
        )
        .bind(jti)
        .bind(now())
        .fetch_optional(self.pool())
        .await?)
    }

    async fn revoke_session(&self, jti: Uuid) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query("update sessions set revoked_at = coalesce(revoked_at, $2) where jti = $1")
            .bind(jti)
            .bind(now())
            .execute(&mut *tx.tx)
            .await?;
        self.commit(tx).await
    }

    async fn create_api_token(
        &self,
        row: &ApiTokenRow,
        token_hash: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "insert into api_tokens (id, name, token_hash, scopes, created_by, expires_at, created_at) \
             values ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(row.id)
        .bind(&row.name)
        .bind(token_hash)
        .bind(json_list(&row.scopes))
        .bind(&row.created_by)
        .bind(row.expires_at)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        self.commit(tx).await
    }

    async fn use_api_token(&self, token_hash: &str) -> Result<Option<ApiTokenRow>, StoreError> {
        let mut tx = self.write().await?;
        let row = sqlx::query_as::<_, TokenRow>(sqlx::AssertSqlSafe(format!(
            "update api_tokens set last_used_at = $2 \
             where token_hash = $1 and revoked_at is null and (expires_at is null or expires_at > $2) \
             returning {TOKEN_COLUMNS}"
        )))
        .bind(token_hash)
        .bind(now())
        .fetch_optional(&mut *tx.tx)
        .await?;
        self.commit(tx).await?;
        Ok(row.map(Into::into))
    }

    async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRow>, StoreError> {
        let rows = sqlx::query_as::<_, TokenRow>(sqlx::AssertSqlSafe(format!(
            "select {TOKEN_COLUMNS} from api_tokens order by created_at"
        )))
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn revoke_api_token(&self, id: Uuid) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let done = sqlx::query(
            "update api_tokens set revoked_at = $2 where id = $1 and revoked_at is null",
        )
        .bind(id)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        self.commit(tx).await?;
        Ok(done.rows_affected() == 1)
    }

    async fn server_by_token(&self, token_hash: &str) -> Result<Option<ServerRow>, StoreError> {
        crate::reads::lite::server_by_token(self.pool(), token_hash).await
    }

    async fn create_sso(
        &self,
        token_hash: &str,
        user_id: i64,
        server_name: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "insert into sso_tokens (token_hash, user_id, server_name, expires_at, created_at) \
             values ($1, $2, $3, $4, $5)",
        )
        .bind(token_hash)
        .bind(user_id)
        .bind(server_name)
        .bind(expires_at)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        self.commit(tx).await
    }

    async fn consume_sso(&self, token_hash: &str) -> Result<Option<SsoGrant>, StoreError> {
        // Writers take turns: of two uses, the second finds `used_at` set.
        let at = now();
        let mut tx = self.write().await?;
        let grant = sqlx::query_as::<_, SsoGrant>(
            "select u.name as user_name, t.server_name, t.expires_at \
             from sso_tokens t join users u on u.id = t.user_id \
             where t.token_hash = $1 and t.used_at is null and t.expires_at > $2 and u.active",
        )
        .bind(token_hash)
        .bind(at)
        .fetch_optional(&mut *tx.tx)
        .await?;
        if grant.is_some() {
            sqlx::query("update sso_tokens set used_at = $2 where token_hash = $1")
                .bind(token_hash)
                .bind(at)
                .execute(&mut *tx.tx)
                .await?;
        }
        self.commit(tx).await?;
        Ok(grant)
    }

    async fn throttled(&self, keys: &[String]) -> Result<Option<i64>, StoreError> {
        let at = now();
        let until: Option<DateTime<Utc>> = sqlx::query_scalar(
            "select max(locked_until) from login_throttle \
             where key in (select value from json_each($1)) and locked_until > $2",
        )
        .bind(json_list(keys))
        .bind(at)
        .fetch_one(self.pool())
        .await?;
        Ok(until.map(|u| {
            let secs = (u - at).num_milliseconds() as f64 / 1000.0;
            secs.ceil().max(1.0) as i64
        }))
    }

    async fn record_failure(&self, key: &str, rule: ThrottleRule) -> Result<(), StoreError> {
        let at = now();
        let window = TimeDelta::seconds(rule.window_secs);
        let mut tx = self.write().await?;
        let current: Option<(i32, DateTime<Utc>)> =
            sqlx::query_as("select failures, window_start from login_throttle where key = $1")
                .bind(key)
                .fetch_optional(&mut *tx.tx)
                .await?;
        let (failures, start) = match current {
            Some((failures, start)) if start + window >= at => (failures + 1, start),
            _ => (1, at),
        };
        let locked_until = (failures >= rule.max_failures).then_some(start + window);
        sqlx::query(
            "insert into login_throttle (key, failures, window_start, locked_until) \
             values ($1, $2, $3, $4) on conflict (key) do update set \
             failures = $2, window_start = $3, locked_until = coalesce($4, locked_until)",
        )
        .bind(key)
        .bind(failures)
        .bind(start)
        .bind(locked_until)
        .execute(&mut *tx.tx)
        .await?;
        self.commit(tx).await
    }

    async fn clear_failures(&self, key: &str) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query("delete from login_throttle where key = $1")
            .bind(key)
            .execute(&mut *tx.tx)
            .await?;
        self.commit(tx).await
    }

    async fn audit(&self, event: AuditEvent<'_>) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "insert into audit_log (actor, action, target, client_addr, detail, at) \
             values ($1, $2, $3, $4, $5, $6)",
        )
        .bind(event.actor)
        .bind(event.action)
        .bind(event.target)
        .bind(event.client_addr)
        .bind(event.detail)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        self.commit(tx).await
    }

    async fn audit_page(&self, offset: i64, limit: i64) -> Result<Page<AuditRow>, StoreError> {
        crate::reads::lite::audit_page(self.pool(), offset, limit).await
    }
}
