//! `/api/v1/jobs/{id}`: a job's kind, state, attempts, timings and last error.

use axum::{
    Json, Router,
    extract::{Path, State, rejection::PathRejection},
    routing::get,
};
use uuid::Uuid;

use schema::UserName;

use crate::{
    AppState,
    auth::Principal,
    error::{ApiError, ApiResult},
    views::JobView,
};

pub fn router() -> Router<AppState> {
    Router::new().route("/jobs/{id}", get(show))
}

/// A user sees the jobs about their own servers; services need `servers:read`.
async fn show(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<JobView>> {
    let Path(raw) = path?;
    let id = Uuid::parse_str(&raw)
        .map_err(|_| ApiError::BadRequest(format!("{raw:?} is not a job id")))?;
    let job = state
        .store
        .get_job(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    if job.user_name == schema::jobs::SYSTEM_USER {
        // The scheduler's jobs are about the platform, not a user.
        principal.require("admin")?;
    } else {
        let owner = UserName::parse(&job.user_name)?;
        principal.may("servers:read", &owner)?;
    }
    Ok(Json(job.into()))
}
