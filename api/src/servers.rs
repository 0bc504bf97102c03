//! `/api/v1/users/{user}/server` and `/api/v1/users/{user}/servers/{name}`:
//! request, show and stop servers. Only jobs are enqueued here; workers do the rest.

use axum::{
    Json, Router,
    extract::{Path, State, rejection::PathRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use schema::{ServerName, SpawnOutcome, SpawnRequest, StopOutcome, UserName};
use serde::Deserialize;

use crate::{
    AppState,
    body::OptionalJson,
    error::{ApiError, ApiResult},
    users::user_name,
    views::ServerView,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/users/{user}/server",
            post(spawn_default).get(show_default).delete(stop_default),
        )
        .route(
            "/users/{user}/servers/{name}",
            post(spawn_named).get(show_named).delete(stop_named),
        )
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpawnBody {
    /// One of the allowed images; the default image when absent.
    image: Option<String>,
}

type NamedPath = Result<Path<(String, String)>, PathRejection>;

fn named(path: NamedPath) -> ApiResult<(UserName, ServerName)> {
    let Path((user, server)) = path?;
    Ok((UserName::parse(&user)?, ServerName::parse(&server)?))
}

async fn spawn_default(
    state: State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: OptionalJson<SpawnBody>,
) -> ApiResult<Response> {
    spawn(state, user_name(path)?, ServerName::default_server(), body).await
}

async fn spawn_named(
    state: State<AppState>,
    path: NamedPath,
    body: OptionalJson<SpawnBody>,
) -> ApiResult<Response> {
    let (user, server) = named(path)?;
    spawn(state, user, server, body).await
}

async fn show_default(
    state: State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<ServerView>> {
    show(state, user_name(path)?, ServerName::default_server()).await
}

async fn show_named(state: State<AppState>, path: NamedPath) -> ApiResult<Json<ServerView>> {
    let (user, server) = named(path)?;
    show(state, user, server).await
}

async fn stop_default(
    state: State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    stop(state, user_name(path)?, ServerName::default_server()).await
}

async fn stop_named(state: State<AppState>, path: NamedPath) -> ApiResult<Response> {
    let (user, server) = named(path)?;
    stop(state, user, server).await
}

/// 202 with the job while a spawn is pending (a second request is not a second
/// spawn), 200 when the server is already running.
async fn spawn(
    State(state): State<AppState>,
    user: UserName,
    server: ServerName,
    OptionalJson(body): OptionalJson<SpawnBody>,
) -> ApiResult<Response> {
    if let Some(image) = &body.image
        && !state.config.allowed_images.contains(image)
    {
        return Err(ApiError::BadRequest(format!(
            "image {image:?} is not allowed; allowed: {:?}",
            state.config.allowed_images
        )));
    }
    let outcome = state
        .store
        .request_spawn(SpawnRequest {
            user,
            server,
            image: body.image,
        })
        .await?;
    Ok(match outcome {
        SpawnOutcome::Enqueued(row) | SpawnOutcome::AlreadyPending(row) => {
            (StatusCode::ACCEPTED, Json(ServerView::with_job(&row))).into_response()
        }
        SpawnOutcome::AlreadyRunning(row) => {
            (StatusCode::OK, Json(ServerView::from_row(&row))).into_response()
        }
    })
}

async fn show(
    State(state): State<AppState>,
    user: UserName,
    server: ServerName,
) -> ApiResult<Json<ServerView>> {
    let row = state.store.get_server(&user, &server).await?;
    match row {
        Some(row) => Ok(Json(ServerView::with_job(&row))),
        None if state.store.get_user(&user).await?.is_none() => {
            Err(ApiError::NotFound(format!("no user named {user:?}")))
        }
        None => Err(ApiError::NotFound(format!(
            "user {user:?} has no server {server:?}"
        ))),
    }
}

/// 202 with the stop job, or 204 when there is nothing to stop.
async fn stop(
    State(state): State<AppState>,
    user: UserName,
    server: ServerName,
) -> ApiResult<Response> {
    Ok(match state.store.request_stop(&user, &server).await? {
        StopOutcome::Enqueued(row) | StopOutcome::AlreadyStopping(row) => {
            (StatusCode::ACCEPTED, Json(ServerView::with_job(&row))).into_response()
        }
        StopOutcome::NotRunning(_) => StatusCode::NO_CONTENT.into_response(),
    })
}
