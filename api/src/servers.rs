//! `/api/v1/users/{user}/server` and `/api/v1/users/{user}/servers/{name}`:
//! request, show and stop servers, and hand a browser over to one (SSO). Only jobs
//! are enqueued here; workers do the rest.

use std::collections::HashMap;

use axum::{
    Json,
    extract::{FromRequestParts, Path, State},
    http::{StatusCode, request::Parts},
    response::{IntoResponse, Response},
};
use schema::{
    ServerName, ServerState, SpawnOutcome, SpawnRequest, StopOutcome, UserName, prelude::*,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    auth::{ClientAddr, Principal},
    body::{JsonBody, OptionalJson},
    error::{ApiError, ApiResult},
    openapi::{Errors, ServerParams, UserParam},
    tokens::{hash_opaque, new_opaque},
    views::ServerView,
};

/// The query parameter that carries an SSO hand-off token to the proxy.
pub const SSO_PARAM: &str = "berth_sso";

/// How long an SSO hand-off token lives.
const SSO_TTL_SECS: i64 = 300;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(spawn_default, show_default, stop_default))
        .routes(routes!(spawn, show, stop))
        .routes(routes!(log_default))
        .routes(routes!(log))
        .routes(routes!(sso_default))
        .routes(routes!(sso))
        .routes(routes!(verify_sso))
}

/// The user and server a route names; the default server when it names none.
pub struct ServerPath {
    pub user: UserName,
    pub server: ServerName,
}

impl<S: Send + Sync> FromRequestParts<S> for ServerPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(params) =
            Path::<HashMap<String, String>>::from_request_parts(parts, state).await?;
        let user = UserName::parse(params.get("user").map_or("", String::as_str))?;
        let server = match params.get("name") {
            Some(name) => ServerName::parse(name)?,
            None => ServerName::default_server(),
        };
        Ok(Self { user, server })
    }
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SpawnBody {
    /// One of the allowed images; the default image when absent. Not with `profile`.
    image: Option<String>,
    /// One of the profiles open to the user (`GET /api/v1/profiles`); the
    /// `default` profile, if one is defined, when absent.
    profile: Option<String>,
}

/// Starts the default server: 202 with the job while the spawn is pending (a second
/// request is not a second spawn), 200 when it is already running, 429 over a limit.
#[utoipa::path(post, path = "/users/{user}/server", tag = "servers", params(UserParam),
    request_body(content = Option<SpawnBody>, description = "May be left out"),
    responses(
        (status = 202, description = "The spawn is pending", body = ServerView),
        (status = 200, description = "Already running", body = ServerView),
        Errors))]
async fn spawn_default(
    state: State<AppState>,
    principal: Principal,
    path: ServerPath,
    body: OptionalJson<SpawnBody>,
) -> ApiResult<Response> {
    spawn(state, principal, path, body).await
}

/// Starts a named server: 202 with the job while the spawn is pending (a second
/// request is not a second spawn), 200 when it is already running, 429 over a limit.
#[utoipa::path(post, path = "/users/{user}/servers/{name}", tag = "servers",
    params(ServerParams),
    request_body(content = Option<SpawnBody>, description = "May be left out"),
    responses(
        (status = 202, description = "The spawn is pending", body = ServerView),
        (status = 200, description = "Already running", body = ServerView),
        Errors))]
async fn spawn(
    State(state): State<AppState>,
    principal: Principal,
    ServerPath { user, server }: ServerPath,
    OptionalJson(body): OptionalJson<SpawnBody>,
) -> ApiResult<Response> {
    principal.may("servers:write", &user)?;
    if let Some(image) = &body.image
        && *image != state.config.default_image
        && !state.config.allowed_images.contains(image)
    {
        let allowed: Vec<&String> = std::iter::once(&state.config.default_image)
            .chain(&state.config.allowed_images)
            .collect();
        return Err(ApiError::BadRequest(format!(
            "image {image:?} is not allowed; allowed: {allowed:?} (the default, and \
             BERTH_ALLOWED_IMAGES)"
        )));
    }
    let profile = match (&body.image, &body.profile) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "name a profile or an image, not both (a profile names its image)".into(),
            ));
        }
        // An image of the allowed list is the platform's own settings with that image.
        (Some(_), None) => None,
        (None, named) => {
            let caller = match &principal {
                Principal::User { user, .. } => Some(user),
                _ => None,
            };
            crate::profiles::choose(&state, &user, caller, named.as_deref()).await?
        }
    };
    let seen = state.addresses(&principal);
    Ok(
        match request_spawn(&state, user, server, body.image, profile).await? {
            SpawnOutcome::Enqueued(row) | SpawnOutcome::AlreadyPending(row) => {
                (StatusCode::ACCEPTED, Json(ServerView::with_job(&row, seen))).into_response()
            }
            SpawnOutcome::AlreadyRunning(row) => {
                (StatusCode::OK, Json(ServerView::from_row(&row, seen))).into_response()
            }
        },
    )
}

/// The default server: its state, address and the job working on it.
#[utoipa::path(get, path = "/users/{user}/server", tag = "servers", params(UserParam),
    responses((status = 200, description = "The server", body = ServerView), Errors))]
async fn show_default(
    state: State<AppState>,
    principal: Principal,
    path: ServerPath,
) -> ApiResult<Json<ServerView>> {
    show(state, principal, path).await
}

/// A named server: its state, address and the job working on it.
#[utoipa::path(get, path = "/users/{user}/servers/{name}", tag = "servers",
    params(ServerParams),
    responses((status = 200, description = "The server", body = ServerView), Errors))]
async fn show(
    State(state): State<AppState>,
    principal: Principal,
    ServerPath { user, server }: ServerPath,
) -> ApiResult<Json<ServerView>> {
    principal.may("servers:read", &user)?;
    let row = state.db.get_server(&user, &server).await?;
    match row {
        Some(row) => Ok(Json(ServerView::with_job(
            &row,
            state.addresses(&principal),
        ))),
        None if state.db.get_user(&user).await?.is_none() => {
            Err(ApiError::NotFound(format!("no user named {user:?}")))
        }
        None => Err(ApiError::NotFound(format!(
            "user {user:?} has no server {server:?}"
        ))),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    /// How much of the end of the log, in bytes (64 KiB when absent).
    #[param(minimum = 1, maximum = 1_048_576)]
    bytes: Option<u64>,
}

const LOG_DEFAULT_BYTES: u64 = 64 * 1024;
const LOG_MAX_BYTES: u64 = 1024 * 1024;

type LogParams = Result<axum::extract::Query<LogQuery>, axum::extract::rejection::QueryRejection>;

/// The end of the default server's output (local processes: every run, each after
/// a `--- ` line), as text.
#[utoipa::path(get, path = "/users/{user}/server/log", tag = "servers",
    params(UserParam, LogQuery),
    responses((status = 200, description = "The output's end", content_type = "text/plain",
        body = String), Errors))]
async fn log_default(
    state: State<AppState>,
    principal: Principal,
    path: ServerPath,
    query: LogParams,
) -> ApiResult<Response> {
    log(state, principal, path, query).await
}

/// The end of a named server's output (local processes: every run, each after a
/// `--- ` line), as text.
#[utoipa::path(get, path = "/users/{user}/servers/{name}/log", tag = "servers",
    params(ServerParams, LogQuery),
    responses((status = 200, description = "The output's end", content_type = "text/plain",
        body = String), Errors))]
async fn log(
    State(state): State<AppState>,
    principal: Principal,
    ServerPath { user, server }: ServerPath,
    query: LogParams,
) -> ApiResult<Response> {
    principal.may("servers:read", &user)?;
    let axum::extract::Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    log_text(&state, &user, &server, query.bytes).await
}

/// The end of a server's output (`bytes`, default 64 KiB) as `text/plain`; for the
/// API and the dashboard's user page.
pub(crate) async fn log_text(
    state: &AppState,
    user: &UserName,
    server: &ServerName,
    bytes: Option<u64>,
) -> ApiResult<Response> {
    let bytes = bytes.unwrap_or(LOG_DEFAULT_BYTES);
    if bytes == 0 || bytes > LOG_MAX_BYTES {
        return Err(ApiError::BadRequest(format!(
            "bytes must be between 1 and {LOG_MAX_BYTES}"
        )));
    }
    if state.db.get_server(user, server).await?.is_none() {
        return Err(ApiError::NotFound(
            if state.db.get_user(user).await?.is_none() {
                format!("no user named {user:?}")
            } else {
                format!("user {user:?} has no server {server:?}")
            },
        ));
    }
    let Some(logs) = &state.config.server_logs else {
        return Err(ApiError::NotFound(
            "server output is kept for local-process servers only (BERTH_SERVER_LOGS is not set)"
                .into(),
        ));
    };
    let path = schema::server_logs::path(logs, user, server);
    let text = tokio::task::spawn_blocking(move || schema::server_logs::tail(&path, bytes))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    match text {
        Ok(text) => Ok((
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; charset=utf-8",
            )],
            text,
        )
            .into_response()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ApiError::NotFound(format!(
            "server {server:?} of {user:?} has no output yet"
        ))),
        Err(e) => Err(ApiError::Internal(format!("reading the server's log: {e}"))),
    }
}

/// A spawn as every caller requests it (the API, an operator's retry): with the
/// configured per-user and platform limits.
pub(crate) async fn request_spawn(
    state: &AppState,
    user: UserName,
    server: ServerName,
    image: Option<String>,
    profile: Option<schema::profiles::Profile>,
) -> ApiResult<SpawnOutcome> {
    let limit = state.config.max_servers_per_user;
    Ok(state
        .db
        .request_spawn(SpawnRequest {
            user,
            server,
            image,
            max_servers_per_user: (limit > 0).then_some(limit),
            profile,
        })
        .await?)
}

/// A stop as every caller requests it (the API, the dashboard, an operator's
/// retry); one that enqueued a stop is audited with who asked.
pub(crate) async fn request_stop(
    state: &AppState,
    actor: &str,
    addr: &ClientAddr,
    user: &UserName,
    server: &ServerName,
) -> ApiResult<StopOutcome> {
    let outcome = state.db.request_stop(user, server).await?;
    if let StopOutcome::Enqueued(row) = &outcome {
        state
            .audit(
                Some(actor),
                "server_stopped",
                Some(&format!("{user}/{server}")),
                addr,
                json!({ "job_id": row.stop_job_id }),
            )
            .await;
    }
    Ok(outcome)
}

/// Stops the default server: 202 with the stop job, or 204 when there is nothing to
/// stop.
#[utoipa::path(delete, path = "/users/{user}/server", tag = "servers", params(UserParam),
    responses(
        (status = 202, description = "The stop is pending", body = ServerView),
        (status = 204, description = "Nothing to stop"),
        Errors))]
async fn stop_default(
    state: State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    path: ServerPath,
) -> ApiResult<Response> {
    stop(state, principal, addr, path).await
}

/// Stops a named server: 202 with the stop job, or 204 when there is nothing to
/// stop.
#[utoipa::path(delete, path = "/users/{user}/servers/{name}", tag = "servers",
    params(ServerParams),
    responses(
        (status = 202, description = "The stop is pending", body = ServerView),
        (status = 204, description = "Nothing to stop"),
        Errors))]
async fn stop(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    ServerPath { user, server }: ServerPath,
) -> ApiResult<Response> {
    principal.may("servers:write", &user)?;
    Ok(
        match request_stop(&state, &principal.actor(), &addr, &user, &server).await? {
            StopOutcome::Enqueued(row) | StopOutcome::AlreadyStopping(row) => (
                StatusCode::ACCEPTED,
                Json(ServerView::with_job(&row, state.addresses(&principal))),
            )
                .into_response(),
            StopOutcome::NotRunning(_) => StatusCode::NO_CONTENT.into_response(),
        },
    )
}

/// A browser's way in without logging in again.
#[derive(Debug, Serialize, ToSchema)]
struct SsoLink {
    /// The server's address through the proxy, with the token.
    url: String,
    /// Single use, for this server only.
    token: String,
    expires_at: chrono::DateTime<chrono::Utc>,
    /// Seconds.
    expires_in: i64,
}

/// A URL that carries a 5-minute, single-use token for the default server only, so
/// the user's browser reaches it without logging in again.
#[utoipa::path(post, path = "/users/{user}/server/sso", tag = "servers", params(UserParam),
    responses((status = 200, description = "The hand-off", body = SsoLink), Errors))]
async fn sso_default(
    state: State<AppState>,
    principal: Principal,
    path: ServerPath,
) -> ApiResult<Json<SsoLink>> {
    sso(state, principal, path).await
}

/// A URL that carries a 5-minute, single-use token for this named server only, so
/// the user's browser reaches it without logging in again.
#[utoipa::path(post, path = "/users/{user}/servers/{name}/sso", tag = "servers",
    params(ServerParams),
    responses((status = 200, description = "The hand-off", body = SsoLink), Errors))]
async fn sso(
    State(state): State<AppState>,
    principal: Principal,
    ServerPath { user, server }: ServerPath,
) -> ApiResult<Json<SsoLink>> {
    principal.may("servers:write", &user)?;
    let row = state
        .db
        .get_server(&user, &server)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("user {user:?} has no server {server:?}")))?;
    if row.state != ServerState::Running {
        return Err(ApiError::Conflict(format!(
            "the server is {}, not running",
            row.state
        )));
    }
    let token = new_opaque("bsso_");
    let expires_at = chrono::Utc::now() + chrono::Duration::seconds(SSO_TTL_SECS);
    // A hand-off a user asked for ends with the session that asked: logging out
    // there ends the proxy's session it becomes.
    let session = match &principal {
        Principal::User { jti, .. } => Some(*jti),
        _ => None,
    };
    state
        .db
        .create_sso(
            &hash_opaque(&token),
            row.user_id,
            server.as_str(),
            expires_at,
            session,
        )
        .await?;
    // It lands on the proxy, which spends it, sets its cookie and drops it from the URL.
    let url = format!("{}{}", state.origin, schema::server_path(&user, &server));
    Ok(Json(SsoLink {
        url: format!("{url}?{SSO_PARAM}={token}"),
        token,
        expires_at,
        expires_in: SSO_TTL_SECS,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SsoCheck {
    token: String,
}

/// Whose a spent hand-off was.
#[derive(Debug, Serialize, ToSchema)]
struct SsoGrant {
    user: String,
    /// `""` for the default server.
    server: String,
}

/// Used by the server (with its own token) or a proxy (with `servers:read`): says
/// whose the token is, and spends it.
#[utoipa::path(post, path = "/sso/verify", tag = "servers", request_body = SsoCheck,
    responses((status = 200, description = "Whose it was", body = SsoGrant), Errors))]
async fn verify_sso(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(check): JsonBody<SsoCheck>,
) -> ApiResult<Json<SsoGrant>> {
    if !matches!(principal, Principal::Server { .. }) {
        principal.require("servers:read")?;
    }
    // Checked where the token is spent: another server's attempt, or one after the
    // server stopped, leaves it unspent.
    let caller = match &principal {
        Principal::Server { server } => Some(server.id),
        _ => None,
    };
    let grant = state
        .db
        .consume_sso(&hash_opaque(&check.token), caller)
        .await?
        .ok_or_else(|| {
            ApiError::Unauthorized(
                "the SSO token is unknown, expired, already used, or not for a running server of yours"
                    .into(),
            )
        })?;
    Ok(Json(SsoGrant {
        user: grant.user_name,
        server: grant.server_name,
    }))
}
