//! `/api/v1/admin`: accounts, service tokens and the audit log. Admins only.

use axum::{
    Json,
    extract::{Path, Query, State, rejection::PathRejection},
    http::StatusCode,
};
use chrono::{DateTime, Utc};
use schema::{Role, accounts::ApiTokenRow, prelude::*};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    AppState,
    accounts::new_account,
    auth::{ClientAddr, Principal, SCOPES, SERVICE_TOKEN_PREFIX},
    body::JsonBody,
    error::{ApiError, ApiResult},
    openapi::{Errors, UserParam},
    tokens::{hash_opaque, new_opaque},
    users::{Removal, create_account, remove_user, user_name},
    views::UserView,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_users, create_user))
        .routes(routes!(update_user, delete_user))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(audit))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct Paging {
    /// Which page, from 1.
    #[serde(default = "first_page")]
    #[param(minimum = 1, maximum = 1_000_000)]
    page: i64,
    /// How many on a page.
    #[serde(default = "default_per_page")]
    #[param(minimum = 1, maximum = 500)]
    per_page: i64,
    /// Part of a name or email.
    #[param(max_length = 200)]
    q: Option<String>,
}

fn first_page() -> i64 {
    1
}

fn default_per_page() -> i64 {
    50
}

/// The furthest page a listing goes to, and the longest search text.
const MAX_PAGE: i64 = 1_000_000;
const MAX_SEARCH: usize = 200;

impl Paging {
    fn window(&self) -> ApiResult<(i64, i64)> {
        if !(1..=MAX_PAGE).contains(&self.page) || !(1..=500).contains(&self.per_page) {
            return Err(ApiError::BadRequest(format!(
                "page is 1 to {MAX_PAGE}; per_page is 1 to 500"
            )));
        }
        if self
            .q
            .as_ref()
            .is_some_and(|q| q.chars().count() > MAX_SEARCH)
        {
            return Err(ApiError::BadRequest(format!(
                "q is at most {MAX_SEARCH} characters"
            )));
        }
        Ok(((self.page - 1) * self.per_page, self.per_page))
    }
}

fn paging(
    query: Result<Query<Paging>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<(Paging, i64, i64)> {
    let Query(paging) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (offset, limit) = paging.window()?;
    Ok((paging, offset, limit))
}

/// A page of accounts.
#[derive(Debug, Serialize, ToSchema)]
struct UsersPage {
    users: Vec<UserView>,
    page: i64,
    per_page: i64,
    /// How many match, on every page.
    total: i64,
}

/// Accounts with their servers, a page at a time, optionally narrowed by `q`.
#[utoipa::path(get, path = "/admin/users", tag = "admin", params(Paging),
    responses((status = 200, description = "A page of accounts", body = UsersPage), Errors))]
async fn list_users(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<Query<Paging>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<UsersPage>> {
    principal.require("admin")?;
    let (paging, offset, limit) = paging(query)?;
    let page = state
        .db
        .users_page(paging.q.as_deref(), offset, limit)
        .await?;
    let ids: Vec<i64> = page.items.iter().map(|u| u.id).collect();
    let servers = state.db.servers_of(&ids).await?;
    let users: Vec<UserView> = page
        .items
        .iter()
        .map(|u| UserView::new(u, &servers, state.addresses(&principal)))
        .collect();
    Ok(Json(UsersPage {
        users,
        page: paging.page,
        per_page: paging.per_page,
        total: page.total,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewUserBody {
    #[schema(pattern = "^[a-z0-9]+(-[a-z0-9]+)*$", max_length = 32)]
    username: String,
    #[serde(default)]
    #[schema(
        pattern = "^[A-Za-z0-9._+%'~-]{1,64}@[A-Za-z0-9_+%~-]+(\\.[A-Za-z0-9_+%~-]+)+$",
        max_length = 254
    )]
    email: Option<String>,
    /// Without one the account cannot log in with a password; 10 to 256
    /// characters, not one repeated.
    #[serde(default)]
    #[schema(min_length = 10, max_length = 256, pattern = "^(?!(.)\\1*$)")]
    password: Option<String>,
    /// `user` when absent.
    #[serde(default)]
    #[schema(value_type = Option<Role>)]
    role: Option<String>,
}

fn role(value: &str) -> ApiResult<Role> {
    Role::parse(value).ok_or_else(|| {
        ApiError::BadRequest(format!("role {value:?} is neither \"user\" nor \"admin\""))
    })
}

/// Creates an account.
#[utoipa::path(post, path = "/admin/users", tag = "admin", request_body = NewUserBody,
    responses((status = 201, description = "The new account", body = UserView), Errors))]
async fn create_user(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    JsonBody(body): JsonBody<NewUserBody>,
) -> ApiResult<(StatusCode, Json<UserView>)> {
    principal.require("admin")?;
    let role = role(body.role.as_deref().unwrap_or("user"))?;
    let account = new_account(&body.username, body.email, body.password, role).await?;
    create_account(&state, &principal, &addr, &account).await
}

/// At least one of the two.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct UserChange {
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = Role, required = false)]
    role: Option<String>,
    /// False deactivates the account: it can no longer log in.
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = bool, required = false)]
    active: Option<bool>,
    /// The groups the account is in (replaces them), for profiles' rules.
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = Vec<schema::profiles::GroupName>, required = false, max_items = 100)]
    groups: Option<Vec<String>>,
}

/// A field that may be left out but is not `null` (which would change nothing).
fn not_null<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Promotes, demotes, deactivates or reactivates an account.
#[utoipa::path(patch, path = "/admin/users/{user}", tag = "admin", params(UserParam),
    request_body = UserChange,
    responses((status = 200, description = "The account", body = UserView), Errors))]
async fn update_user(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    path: Result<Path<String>, PathRejection>,
    JsonBody(change): JsonBody<UserChange>,
) -> ApiResult<Json<UserView>> {
    principal.require("admin")?;
    let name = user_name(path)?;
    let new_role = change.role.as_deref().map(role).transpose()?;
    if new_role.is_none() && change.active.is_none() && change.groups.is_none() {
        return Err(ApiError::BadRequest(
            "change \"role\", \"active\" or \"groups\"".into(),
        ));
    }
    if let Some(groups) = &change.groups {
        check_groups(groups)?;
    }
    let mut user = None;
    if new_role.is_some() || change.active.is_some() {
        user = Some(
            change_account(
                &state,
                &principal.actor(),
                &addr,
                &name,
                new_role,
                change.active,
            )
            .await?,
        );
    }
    if let Some(groups) = &change.groups {
        user = Some(change_groups(&state, &principal.actor(), &addr, &name, groups).await?);
    }
    let user = user.expect("one change was made");
    let servers = state.db.servers_of(&[user.id]).await?;
    Ok(Json(UserView::new(
        &user,
        &servers,
        state.addresses(&principal),
    )))
}

fn check_groups(groups: &[String]) -> ApiResult<()> {
    if groups.len() > 100 {
        return Err(ApiError::BadRequest("at most 100 groups".into()));
    }
    for group in groups {
        schema::profiles::check_group(group).map_err(ApiError::BadRequest)?;
    }
    Ok(())
}

/// Sets an account's groups, audited; shared by the API and the dashboard.
pub(crate) async fn change_groups(
    state: &AppState,
    actor: &str,
    addr: &ClientAddr,
    name: &schema::UserName,
    groups: &[String],
) -> ApiResult<schema::UserRow> {
    check_groups(groups)?;
    let updated = state.db.set_groups(name, groups).await?;
    state
        .audit(
            Some(actor),
            "groups_changed",
            Some(&updated.name),
            addr,
            json!({ "groups": updated.groups() }),
        )
        .await;
    Ok(updated)
}

/// Promotes, demotes, (de)activates an account, audited; at least one change.
/// Shared by the API and the dashboard.
pub(crate) async fn change_account(
    state: &AppState,
    actor: &str,
    addr: &ClientAddr,
    name: &schema::UserName,
    new_role: Option<Role>,
    active: Option<bool>,
) -> ApiResult<schema::UserRow> {
    let mut user = None;
    if let Some(new_role) = new_role {
        let updated = state.db.set_role(name, new_role).await?;
        state
            .audit(
                Some(actor),
                "role_changed",
                Some(&updated.name),
                addr,
                json!({ "role": updated.role }),
            )
            .await;
        user = Some(updated);
    }
    if let Some(active) = active {
        let updated = state.db.set_active(name, active).await?;
        let action = if active {
            "user_activated"
        } else {
            "user_deactivated"
        };
        state
            .audit(Some(actor), action, Some(&updated.name), addr, json!({}))
            .await;
        user = Some(updated);
    }
    user.ok_or_else(|| ApiError::BadRequest("change \"role\" or \"active\"".into()))
}

/// Removes an account: a cleanup job stops its servers and removes its volume first.
#[utoipa::path(delete, path = "/admin/users/{user}", tag = "admin", params(UserParam),
    responses((status = 202, description = "The removal is under way", body = Removal), Errors))]
async fn delete_user(
    state: State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<(StatusCode, Json<Removal>)> {
    principal.require("admin")?;
    remove_user(state, principal, addr, path).await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewToken {
    /// 1 to 100 characters, not only spaces.
    #[schema(min_length = 1, max_length = 100, pattern = "\\S")]
    name: String,
    /// At least one.
    #[schema(value_type = Vec<Scope>, min_items = 1)]
    scopes: Vec<String>,
    /// Seconds until the token expires; never when absent.
    #[serde(default, deserialize_with = "crate::body::whole_or_none")]
    #[schema(minimum = 1, maximum = 316_224_000)]
    expires_in: Option<i64>,
}

/// What a token may do; `admin` implies every other.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
enum Scope {
    #[schema(rename = "servers:read")]
    ServersRead,
    #[schema(rename = "servers:write")]
    ServersWrite,
    #[schema(rename = "servers:access")]
    ServersAccess,
    #[schema(rename = "users:read")]
    UsersRead,
    #[schema(rename = "users:write")]
    UsersWrite,
    #[schema(rename = "admin")]
    Admin,
}

#[derive(Debug, Serialize, ToSchema)]
struct TokenView {
    id: Uuid,
    name: String,
    scopes: Vec<String>,
    created_by: Option<String>,
    created: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    last_used: Option<DateTime<Utc>>,
    revoked: Option<chrono::DateTime<Utc>>,
}

impl From<ApiTokenRow> for TokenView {
    fn from(t: ApiTokenRow) -> Self {
        Self {
            id: t.id,
            name: t.name,
            scopes: t.scopes,
            created_by: t.created_by,
            created: t.created_at,
            expires_at: t.expires_at,
            last_used: t.last_used_at,
            revoked: t.revoked_at,
        }
    }
}

/// A new token: the token itself is in this answer only, Berth keeps its hash.
#[derive(Debug, Serialize, ToSchema)]
struct NewTokenView {
    #[serde(flatten)]
    view: TokenView,
    /// Send as `Authorization: Bearer <token>`.
    token: String,
}

/// Issues an API token with scopes.
#[utoipa::path(post, path = "/admin/tokens", tag = "admin", request_body = NewToken,
    responses((status = 201, description = "The token, shown once", body = NewTokenView), Errors))]
async fn create_token(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    JsonBody(body): JsonBody<NewToken>,
) -> ApiResult<(StatusCode, Json<NewTokenView>)> {
    principal.require("admin")?;
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::BadRequest(
            "a token needs a name of 1 to 100 characters".into(),
        ));
    }
    if body.scopes.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "name at least one scope of {SCOPES:?}"
        )));
    }
    if let Some(unknown) = body.scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
        return Err(ApiError::BadRequest(format!(
            "unknown scope {unknown:?}; scopes are {SCOPES:?}"
        )));
    }
    // Ten years at most: beyond that a time no longer fits every store's range.
    const MAX_EXPIRES_IN: i64 = 10 * 366 * 24 * 3600;
    let expires_at = match body.expires_in {
        Some(secs) if !(1..=MAX_EXPIRES_IN).contains(&secs) => {
            return Err(ApiError::BadRequest(format!(
                "expires_in is 1 to {MAX_EXPIRES_IN} seconds; leave it out for a token that does not expire"
            )));
        }
        Some(secs) => Some(Utc::now() + chrono::Duration::seconds(secs)),
        None => None,
    };
    let token = new_opaque(SERVICE_TOKEN_PREFIX);
    let row = ApiTokenRow {
        id: Uuid::new_v4(),
        name: name.to_owned(),
        scopes: body.scopes,
        created_by: Some(principal.actor()),
        created_at: Utc::now(),
        expires_at,
        last_used_at: None,
        revoked_at: None,
    };
    state
        .db
        .create_api_token(&row, &hash_opaque(&token))
        .await?;
    state
        .audit(
            Some(&principal.actor()),
            "token_created",
            Some(&row.name),
            &addr,
            json!({ "id": row.id, "scopes": row.scopes }),
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(NewTokenView {
            view: row.into(),
            token,
        }),
    ))
}

/// Every API token, revoked ones too, without the tokens themselves.
#[utoipa::path(get, path = "/admin/tokens", tag = "admin",
    responses((status = 200, description = "The tokens", body = Vec<TokenView>), Errors))]
async fn list_tokens(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Vec<TokenView>>> {
    principal.require("admin")?;
    Ok(Json(
        state
            .db
            .list_api_tokens()
            .await?
            .into_iter()
            .map(TokenView::from)
            .collect(),
    ))
}

/// Revokes a token at once, on every API process.
#[utoipa::path(delete, path = "/admin/tokens/{id}", tag = "admin",
    params(("id" = Uuid, Path, description = "The token's id")),
    responses((status = 204, description = "Revoked"), Errors))]
async fn revoke_token(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    principal.require("admin")?;
    let Path(raw) = path?;
    let id = Uuid::parse_str(&raw)
        .map_err(|_| ApiError::BadRequest(format!("{raw:?} is not a token id")))?;
    if !state.db.revoke_api_token(id).await? {
        return Err(ApiError::NotFound(format!("no live token {id}")));
    }
    state
        .audit(
            Some(&principal.actor()),
            "token_revoked",
            Some(&id.to_string()),
            &addr,
            json!({}),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// The audit log's query: a page, and what narrows it.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Which page, from 1.
    #[serde(default = "first_page")]
    #[param(minimum = 1, maximum = 1_000_000)]
    page: i64,
    /// How many on a page.
    #[serde(default = "default_per_page")]
    #[param(minimum = 1, maximum = 500)]
    per_page: i64,
    /// Who acted (exactly).
    #[param(max_length = 200)]
    actor: Option<String>,
    /// What they did (exactly).
    #[param(max_length = 200)]
    action: Option<String>,
    /// Part of the target.
    #[param(max_length = 200)]
    target: Option<String>,
    /// At or after (RFC 3339).
    since: Option<DateTime<Utc>>,
    /// Before (RFC 3339).
    until: Option<DateTime<Utc>>,
}

/// One security event.
#[derive(Debug, Serialize, ToSchema)]
struct AuditEntry {
    id: i64,
    at: DateTime<Utc>,
    /// Who acted: a user's name, `token:<name>`, or none for the anonymous.
    actor: Option<String>,
    action: String,
    target: Option<String>,
    client_addr: Option<String>,
    detail: serde_json::Value,
}

/// A page of the audit log, newest first.
#[derive(Debug, Serialize, ToSchema)]
struct AuditPage {
    entries: Vec<AuditEntry>,
    page: i64,
    per_page: i64,
    total: i64,
}

/// The audit log, newest first, narrowed by who, what, which and when.
#[utoipa::path(get, path = "/admin/audit", tag = "admin", params(AuditQuery),
    responses((status = 200, description = "A page of events", body = AuditPage), Errors))]
async fn audit(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<AuditPage>> {
    principal.require("admin")?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let paging = Paging {
        page: q.page,
        per_page: q.per_page,
        q: None,
    };
    let (offset, limit) = paging.window()?;
    let text = |name: &str, value: Option<String>| -> ApiResult<Option<String>> {
        match value.filter(|v| !v.is_empty()) {
            Some(v) if v.chars().count() > MAX_SEARCH => Err(ApiError::BadRequest(format!(
                "{name} is at most {MAX_SEARCH} characters"
            ))),
            v => Ok(v),
        }
    };
    let filter = schema::accounts::AuditFilter {
        actor: text("actor", q.actor)?,
        action: text("action", q.action)?,
        target: text("target", q.target)?,
        since: q.since,
        until: q.until,
    };
    let page = state.db.audit_page(&filter, offset, limit).await?;
    let entries = page
        .items
        .into_iter()
        .map(|e| AuditEntry {
            id: e.id,
            at: e.at,
            actor: e.actor,
            action: e.action,
            target: e.target,
            client_addr: e.client_addr,
            detail: e.detail,
        })
        .collect();
    Ok(Json(AuditPage {
        entries,
        page: paging.page,
        per_page: paging.per_page,
        total: page.total,
    }))
}
