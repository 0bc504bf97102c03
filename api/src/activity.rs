//! Activity reports: JupyterHub's `POST /users/{user}/activity` body, and a
//! heartbeat a browser tab calls to keep its server from being culled. Timestamps
//! only move forward; one in the future is refused.

use std::collections::HashMap;

use axum::{Router, extract::State, http::StatusCode, routing::post};
use chrono::{DateTime, Utc};
use schema::{ServerName, UserName, prelude::*};
use serde::Deserialize;

use crate::{
    AppState,
    auth::Principal,
    body::JsonBody,
    error::{ApiError, ApiResult},
    servers::ServerPath,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/users/{user}/activity", post(activity))
        .route("/users/{user}/server/heartbeat", post(heartbeat))
        .route("/users/{user}/servers/{name}/heartbeat", post(heartbeat))
}

/// JupyterHub's shape: `{"last_activity": …, "servers": {"name": {"last_activity": …}}}`
/// (the default server is `""`).
#[derive(Debug, Deserialize)]
struct ActivityBody {
    last_activity: Option<DateTime<Utc>>,
    #[serde(default)]
    servers: HashMap<String, ServerActivity>,
}

#[derive(Debug, Deserialize)]
struct ServerActivity {
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
