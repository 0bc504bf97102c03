//! `/api/v1/jobs/{id}`: a job's kind, state, attempts, timings and last error.

use axum::{
    Json, Router,
    extract::{Path, State, rejection::PathRejection},
    routing::get,
};
use uuid::Uuid;

use crate::{
    AppState,
    error::{ApiError, ApiResult},
    views::JobView,
};

pub fn router() -> Router<AppState> {
    Router::new().route("/jobs/{id}", get(show))
}

async fn show(
    State(state): State<AppState>,
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
    Ok(Json(job.into()))
}
