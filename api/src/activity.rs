//! Activity reports: JupyterHub's `POST /users/{user}/activity` body, and a
//! heartbeat a browser tab calls to keep its server from being culled. Timestamps
//! only move forward; one in the future is refused.

use std::collections::HashMap;

use axum::{extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use schema::{ServerName, UserName, prelude::*};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    auth::Principal,
    body::JsonBody,
    error::{ApiError, ApiResult},
    openapi::{Errors, ServerParams, UserParam},
    servers::ServerPath,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(activity))
        .routes(routes!(heartbeat_default))
        .routes(routes!(heartbeat))
}

/// JupyterHub's shape: `{"last_activity": …, "servers": {"name": {"last_activity": …}}}`
/// (the default server is `""`).
#[derive(Debug, Deserialize, ToSchema)]
struct ActivityBody {
    /// RFC 3339, not in the future.
    #[schema(
        pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$"
    )]
    last_activity: Option<DateTime<Utc>>,
    #[serde(default)]
    servers: HashMap<String, ServerActivity>,
}

#[derive(Debug, Deserialize, ToSchema)]
struct ServerActivity {
    /// RFC 3339, not in the future.
    #[schema(
        pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$"
    )]
    last_activity: DateTime<Utc>,
}

/// Clocks of reporters drift a little; more than this ahead is refused.
const SKEW_SECS: i64 = 1;

fn not_in_future(what: &str, at: DateTime<Utc>) -> ApiResult<DateTime<Utc>> {
    if at > Utc::now() + chrono::Duration::seconds(SKEW_SECS) {
        return Err(ApiError::BadRequest(format!(
            "{what} {} is in the future",
            at.to_rfc3339()
        )));
    }
    Ok(at)
}

/// Reports when the user and their servers were last active (JupyterHub's body);
/// times only move forward.
#[utoipa::path(post, path = "/users/{user}/activity", tag = "users", params(UserParam),
    request_body = ActivityBody,
    responses((status = 204, description = "Recorded"), Errors))]
async fn activity(
    State(state): State<AppState>,
    principal: Principal,
    axum::extract::Path(user): axum::extract::Path<String>,
    JsonBody(body): JsonBody<ActivityBody>,
) -> ApiResult<StatusCode> {
    let user = UserName::parse(&user)?;
    if body.last_activity.is_none() && body.servers.is_empty() {
        return Err(ApiError::BadRequest(
            "nothing to record: give last_activity or servers".into(),
        ));
    }
    let user_at = body
        .last_activity
        .map(|at| not_in_future("last_activity", at))
        .transpose()?;
    let mut servers = Vec::with_capacity(body.servers.len());
    for (name, report) in body.servers {
        let server = if name.is_empty() {
            ServerName::default_server()
        } else {
            ServerName::parse(&name)?
        };
        let at = not_in_future(
            &format!("last_activity of server {name:?}"),
            report.last_activity,
        )?;
        principal.may_report(&user, &server)?;
        servers.push((server, at));
    }
    if servers.is_empty() {
        principal.may("servers:write", &user)?;
    }
    state.db.record_activity(&user, user_at, &servers).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The default server is in use now: keeps it from being culled.
#[utoipa::path(post, path = "/users/{user}/server/heartbeat", tag = "servers",
    params(UserParam), responses((status = 204, description = "Recorded"), Errors))]
async fn heartbeat_default(
    state: State<AppState>,
    principal: Principal,
    path: ServerPath,
) -> ApiResult<StatusCode> {
    heartbeat(state, principal, path).await
}

/// The named server is in use now: keeps it from being culled.
#[utoipa::path(post, path = "/users/{user}/servers/{name}/heartbeat", tag = "servers",
    params(ServerParams), responses((status = 204, description = "Recorded"), Errors))]
async fn heartbeat(
    State(state): State<AppState>,
    principal: Principal,
    ServerPath { user, server }: ServerPath,
) -> ApiResult<StatusCode> {
    principal.may_report(&user, &server)?;
    state
        .db
        .record_activity(&user, None, &[(server, Utc::now())])
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
