//! `/api/v1/admin`: accounts, service tokens and the audit log. Admins only.

use axum::{
    Json, Router,
    extract::{Path, Query, State, rejection::PathRejection},
    http::StatusCode,
    routing::{delete, get, patch},
};
use chrono::{DateTime, Utc};
use schema::{Role, accounts::ApiTokenRow, prelude::*};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    AppState,
    accounts::new_account,
    auth::{ClientAddr, Principal, SCOPES, SERVICE_TOKEN_PREFIX},
    body::JsonBody,
    error::{ApiError, ApiResult},
    tokens::{hash_opaque, new_opaque},
    users::{create_account, remove_user, user_name},
    views::UserView,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/users", get(list_users).post(create_user))
        .route(
            "/admin/users/{user}",
            patch(update_user).delete(delete_user),
        )
        .route("/admin/tokens", get(list_tokens).post(create_token))
        .route("/admin/tokens/{id}", delete(revoke_token))
        .route("/admin/audit", get(audit))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Paging {
    #[serde(default = "first_page")]
    page: i64,
    #[serde(default = "default_per_page")]
    per_page: i64,
    /// Part of a name or email.
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

async fn list_users(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<Query<Paging>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
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
    Ok(Json(
        json!({ "users": users, "page": paging.page, "per_page": paging.per_page, "total": page.total }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUserBody {
    username: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    role: Option<String>,
}

fn role(value: &str) -> ApiResult<Role> {
    Role::parse(value).ok_or_else(|| {
        ApiError::BadRequest(format!("role {value:?} is neither \"user\" nor \"admin\""))
    })
}

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserChange {
    role: Option<String>,
    active: Option<bool>,
}

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
    if new_role.is_none() && change.active.is_none() {
        return Err(ApiError::BadRequest("change \"role\" or \"active\"".into()));
    }
    let user = change_account(
        &state,
        &principal.actor(),
        &addr,
        &name,
        new_role,
        change.active,
    )
    .await?;
    let servers = state.db.servers_of(&[user.id]).await?;
    Ok(Json(UserView::new(
        &user,
        &servers,
        state.addresses(&principal),
    )))
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

async fn delete_user(
    state: State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    principal.require("admin")?;
    remove_user(state, principal, addr, path).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    scopes: Vec<String>,
    /// Seconds until the token expires; never when absent.
    #[serde(default)]
    expires_in: Option<i64>,
}

#[derive(Debug, Serialize)]
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

/// The token itself is in this answer only; Berth keeps its hash.
async fn create_token(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    JsonBody(body): JsonBody<NewToken>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    principal.require("admin")?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > 100 {
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
    let mut view = serde_json::to_value(TokenView::from(row)).expect("serialises");
    view["token"] = Value::String(token);
    Ok((StatusCode::CREATED, Json(view)))
}

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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    #[serde(default = "first_page")]
    page: i64,
    #[serde(default = "default_per_page")]
    per_page: i64,
    /// Who acted (exactly).
    actor: Option<String>,
    /// What they did (exactly).
    action: Option<String>,
    /// Part of the target.
    target: Option<String>,
    /// At or after (RFC 3339).
    since: Option<DateTime<Utc>>,
    /// Before (RFC 3339).
    until: Option<DateTime<Utc>>,
}

async fn audit(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
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
    let entries: Vec<Value> = page
        .items
        .into_iter()
        .map(|e| {
            json!({ "id": e.id, "at": e.at, "actor": e.actor, "action": e.action,
                    "target": e.target, "client_addr": e.client_addr, "detail": e.detail })
        })
        .collect();
    Ok(Json(
        json!({ "entries": entries, "page": paging.page, "per_page": paging.per_page, "total": page.total }),
    ))
}
