//! `/api/v1/users`: create, list, show and delete users.

use axum::{
    Json, Router,
    extract::{Path, State, rejection::PathRejection},
    http::StatusCode,
    routing::get,
};
use schema::UserName;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    AppState,
    body::OptionalJson,
    error::{ApiError, ApiResult},
    views::{JobView, UserView},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/users", get(list))
        .route("/users/{user}", get(show).post(create).delete(remove))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    #[serde(default)]
    admin: bool,
}

pub fn user_name(path: Result<Path<String>, PathRejection>) -> ApiResult<UserName> {
    let Path(raw) = path?;
    Ok(UserName::parse(&raw)?)
}

async fn list(State(state): State<AppState>) -> ApiResult<Json<Vec<UserView>>> {
    let users = state.store.list_users().await?;
    let ids: Vec<i64> = users.iter().map(|u| u.id).collect();
    let servers = state.store.servers_of(&ids).await?;
    Ok(Json(
        users.iter().map(|u| UserView::new(u, &servers)).collect(),
    ))
}

async fn show(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<UserView>> {
    let name = user_name(path)?;
    let user = state
        .store
        .get_user(&name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no user named {name:?}")))?;
    let servers = state.store.servers_of(&[user.id]).await?;
    Ok(Json(UserView::new(&user, &servers)))
}

async fn create(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    OptionalJson(new): OptionalJson<NewUser>,
) -> ApiResult<(StatusCode, Json<UserView>)> {
    let name = user_name(path)?;
    let user = state.store.create_user(&name, new.admin).await?;
    Ok((StatusCode::CREATED, Json(UserView::new(&user, &[]))))
}

/// Deleting a user is a cleanup job: every server stopped, the volume removed, then the user.
async fn remove(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let name = user_name(path)?;
    let job = state.store.request_user_removal(&name).await?;
    let job = JobView::from(job);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "name": name, "state": "deleting", "job_id": job.id, "job": job })),
    ))
}
