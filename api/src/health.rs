//! Liveness and readiness.

use std::time::Duration;

use axum::{Json, extract::State};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use schema::prelude::*;

use crate::{
    AppState,
    error::ApiError,
    openapi::{ErrorBody, Errors},
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    status: &'static str,
    version: &'static str,
    /// Seconds since the process started.
    uptime: u64,
    timestamp: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// Always `ready`.
    status: &'static str,
}

/// The process answers: it is alive, whatever the database does.
#[utoipa::path(get, path = "/health", tag = "health", security(()),
    responses((status = 200, description = "Alive", body = Health), Errors))]
async fn health(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        uptime: state.started.elapsed().as_secs(),
        timestamp: chrono::Utc::now(),
    })
}

/// Ready only while the database answers, within a second.
#[utoipa::path(get, path = "/ready", tag = "health", security(()),
    responses((status = 200, description = "The database answers", body = Ready),
        (status = 503, description = "The database does not answer", body = ErrorBody), Errors))]
async fn ready(State(state): State<AppState>) -> Result<Json<Ready>, ApiError> {
    match tokio::time::timeout(Duration::from_secs(1), state.db.ping()).await {
        Ok(Ok(())) => Ok(Json(Ready { status: "ready" })),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "not ready: database");
            Err(ApiError::Unavailable("the database is unreachable".into()))
        }
        Err(_) => Err(ApiError::Unavailable(
            "the database did not answer within 1 s".into(),
        )),
    }
}
