//! `/api/v1/users`: create, list, show and delete users.

use axum::{
    Json,
    extract::{Path, State, rejection::PathRejection},
    http::StatusCode,
};
use schema::{Role, UserName, prelude::*};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    auth::{ClientAddr, Principal},
    body::OptionalJson,
    error::{ApiError, ApiResult},
    openapi::{Errors, UserParam},
    views::{JobView, UserView},
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show, create, delete_user))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewUser {
    /// An admin account (needs an admin).
    #[serde(default)]
    admin: bool,
}

/// A user's removal under way.
#[derive(Debug, Serialize, ToSchema)]
pub struct Removal {
    name: String,
    /// Always `deleting`.
    state: &'static str,
    pub job_id: uuid::Uuid,
    /// The cleanup job.
    job: JobView,
}

pub fn user_name(path: Result<Path<String>, PathRejection>) -> ApiResult<UserName> {
    let Path(raw) = path?;
    Ok(UserName::parse(&raw)?)
}

/// Every user with their servers.
#[utoipa::path(get, path = "/users", tag = "users",
    responses((status = 200, description = "The users", body = Vec<UserView>), Errors))]
async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Vec<UserView>>> {
    principal.require("users:read")?;
    let users = state.db.list_users().await?;
    let ids: Vec<i64> = users.iter().map(|u| u.id).collect();
    let servers = state.db.servers_of(&ids).await?;
    Ok(Json(
        users
            .iter()
            .map(|u| UserView::new(u, &servers, state.addresses(&principal)))
            .collect(),
    ))
}

/// A user with their servers.
#[utoipa::path(get, path = "/users/{user}", tag = "users", params(UserParam),
    responses((status = 200, description = "The user", body = UserView), Errors))]
async fn show(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<UserView>> {
    let name = user_name(path)?;
    principal.may("users:read", &name)?;
    let user = state
        .db
        .get_user(&name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no user named {name:?}")))?;
    let servers = state.db.servers_of(&[user.id]).await?;
    Ok(Json(UserView::new(
        &user,
        &servers,
        state.addresses(&principal),
    )))
}

/// An account without a password, for portals that authenticate users themselves.
#[utoipa::path(post, path = "/users/{user}", tag = "users", params(UserParam),
    request_body(content = Option<NewUser>, description = "May be left out"),
    responses((status = 201, description = "The new account", body = UserView), Errors))]
async fn create(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    path: Result<Path<String>, PathRejection>,
    OptionalJson(new): OptionalJson<NewUser>,
) -> ApiResult<(StatusCode, Json<UserView>)> {
    let name = user_name(path)?;
    principal.require(if new.admin { "admin" } else { "users:write" })?;
    let account = schema::NewAccount {
        name,
        email: None,
        password_hash: None,
        role: if new.admin { Role::Admin } else { Role::User },
    };
    create_account(&state, &principal, &addr, &account).await
}

/// Creates an account on an admin's or a service's behalf, and says so in the audit log.
pub async fn create_account(
    state: &AppState,
    principal: &Principal,
    addr: &ClientAddr,
    account: &schema::NewAccount,
) -> ApiResult<(StatusCode, Json<UserView>)> {
    let user = state.db.register(account).await?;
    state
        .audit(
            Some(&principal.actor()),
            "user_created",
            Some(&user.name),
            addr,
            json!({ "role": user.role }),
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(UserView::new(&user, &[], state.addresses(principal))),
    ))
}

/// Removes a user: a cleanup job stops their servers and removes their volume first.
#[utoipa::path(delete, path = "/users/{user}", tag = "users", params(UserParam),
    responses((status = 202, description = "The removal is under way", body = Removal), Errors))]
async fn delete_user(
    state: State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<(StatusCode, Json<Removal>)> {
    principal.require("users:write")?;
    remove_user(state, principal, addr, path).await
}

/// Deleting a user is a cleanup job: every server stopped, the volume removed, then the user.
pub async fn remove_user(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<(StatusCode, Json<Removal>)> {
    let name = user_name(path)?;
    // A `users:write` token manages ordinary accounts; taking an admin's away
    // needs an admin (demoting one already does).
    if !principal.has_scope("admin")
        && state
            .db
            .get_user(&name)
            .await?
            .is_some_and(|u| u.is_admin())
    {
        return Err(ApiError::Forbidden(format!(
            "{:?} is an admin: deleting an admin needs an admin",
            name.as_str()
        )));
    }
    let job = JobView::from(state.db.request_user_removal(&name).await?);
    state
        .audit(
            Some(&principal.actor()),
            "user_deleted",
            Some(name.as_str()),
            &addr,
            json!({ "job_id": job.id }),
        )
        .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(Removal {
            name: name.as_str().to_owned(),
            state: "deleting",
            job_id: job.id,
            job,
        }),
    ))
}
