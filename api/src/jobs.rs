//! `/api/v1/jobs/{id}`: a job's kind, state, attempts, timings and last error; and
//! an admin's retry (of a failed or cancelled job) and cancel (of a waiting one).

use axum::{
    Json,
    extract::{Path, State, rejection::PathRejection},
    http::StatusCode,
};
use serde_json::json;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use schema::{
    JobKind, JobRow, JobState, ServerName, SpawnOutcome, StopOutcome, UserName, prelude::*,
};

use crate::{
    AppState,
    auth::{ClientAddr, Principal},
    error::{ApiError, ApiResult},
    openapi::Errors,
    views::JobView,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(show))
        .routes(routes!(retry))
        .routes(routes!(cancel))
}

fn job_id(path: Result<Path<String>, PathRejection>) -> ApiResult<Uuid> {
    let Path(raw) = path?;
    Uuid::parse_str(&raw).map_err(|_| ApiError::BadRequest(format!("{raw:?} is not a job id")))
}

/// A user sees the jobs about their own account's servers (not those of an
/// earlier account of the same name: to them such a job does not exist);
/// services need `servers:read`.
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs",
    params(("id" = Uuid, Path, description = "The job's id")),
    responses((status = 200, description = "The job", body = JobView), Errors))]
async fn show(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<JobView>> {
    let id = job_id(path)?;
    let job = find(&state, id).await?;
    if job.user_name == schema::jobs::SYSTEM_USER {
        // The scheduler's jobs are about the platform, not a user.
        principal.require("admin")?;
    } else {
        let owner = UserName::parse(&job.user_name)?;
        principal.may("servers:read", &owner)?;
        if let Principal::User { user, .. } = &principal
            && !principal.has_scope("servers:read")
            && job.user_id != Some(user.id)
        {
            return Err(ApiError::NotFound(format!("no job {id}")));
        }
    }
    Ok(Json(job.into()))
}

/// Retries a failed or cancelled job as a new job (admins).
#[utoipa::path(post, path = "/jobs/{id}/retry", tag = "jobs",
    params(("id" = Uuid, Path, description = "The job's id")),
    responses((status = 202, description = "The new job", body = JobView), Errors))]
async fn retry(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    principal.require("admin")?;
    let job = retry_job(&state, &principal.actor(), &addr, job_id(path)?).await?;
    Ok((StatusCode::ACCEPTED, Json(job.into())))
}

/// Cancels a job that has not begun (admins).
#[utoipa::path(post, path = "/jobs/{id}/cancel", tag = "jobs",
    params(("id" = Uuid, Path, description = "The job's id")),
    responses((status = 200, description = "The cancelled job", body = JobView), Errors))]
async fn cancel(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<JobView>> {
    principal.require("admin")?;
    let job = cancel_job(&state, &principal.actor(), &addr, job_id(path)?).await?;
    Ok(Json(job.into()))
}

async fn find(state: &AppState, id: Uuid) -> ApiResult<JobRow> {
    state
        .db
        .get_job(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))
}

/// Cancels a job that has not started (see `Console::cancel_job`), audited.
pub(crate) async fn cancel_job(
    state: &AppState,
    actor: &str,
    addr: &ClientAddr,
    id: Uuid,
) -> ApiResult<JobRow> {
    let job = state.db.cancel_job(id, actor).await?;
    state
        .audit(
            Some(actor),
            "job_cancelled",
            Some(&id.to_string()),
            addr,
            json!({ "kind": job.kind }),
        )
        .await;
    Ok(job)
}

/// Retries a failed or cancelled job as a new job that names it: a spawn or stop
/// is requested again through the same checks as a user's request (limits, the
/// server's state), a user's removal likewise, a scheduled job runs again with its
/// payload. The new job.
pub(crate) async fn retry_job(
    state: &AppState,
    actor: &str,
    addr: &ClientAddr,
    id: Uuid,
) -> ApiResult<JobRow> {
    let job = find(state, id).await?;
    if !matches!(job.state, JobState::Failed | JobState::Cancelled) {
        return Err(ApiError::Conflict(format!(
            "the job is {}; only a failed or cancelled job can be retried",
            job.state
        )));
    }
    let moved_on =
        |what: &str| ApiError::Conflict(format!("the server is {what} now; nothing to retry"));
    let new_id = match job.kind {
        JobKind::Spawn => {
            let (user, server) = names(&job)?;
            let last = state.db.get_server(&user, &server).await?;
            let (image, profile) = match last.as_ref().and_then(|s| s.profile.as_ref()) {
                Some(_) => (None, crate::profiles::again(state, &user, &server).await?),
                None => (last.and_then(|s| s.image), None),
            };
            match crate::servers::request_spawn(state, user, server, image, profile).await? {
                SpawnOutcome::Enqueued(row) => row.spawn_job_id,
                SpawnOutcome::AlreadyPending(_) => return Err(moved_on("starting")),
                SpawnOutcome::AlreadyRunning(_) => return Err(moved_on("running")),
            }
        }
        JobKind::Stop => {
            let (user, server) = names(&job)?;
            match crate::servers::request_stop(state, actor, addr, &user, &server).await? {
                StopOutcome::Enqueued(row) => row.stop_job_id,
                StopOutcome::AlreadyStopping(_) => return Err(moved_on("stopping")),
                StopOutcome::NotRunning(row) => return Err(moved_on(row.state.as_str())),
            }
        }
        JobKind::Cleanup => {
            let user = UserName::parse(&job.user_name)?;
            let removal = state.db.request_user_removal(&user).await?;
            Some(removal.id).filter(|new| *new != job.id)
        }
        JobKind::Cull | JobKind::ExpireSessions | JobKind::Archive => {
            Some(state.db.repeat_job(&job).await?.id)
        }
    };
    let new_id = new_id.ok_or_else(|| ApiError::Conflict("nothing was enqueued".into()))?;
    state.db.link_retry(new_id, job.id).await?;
    state
        .audit(
            Some(actor),
            "job_retried",
            Some(&id.to_string()),
            addr,
            json!({ "kind": job.kind, "retry": new_id }),
        )
        .await;
    find(state, new_id).await
}

fn names(job: &JobRow) -> ApiResult<(UserName, ServerName)> {
    let user = UserName::parse(&job.user_name)?;
    let server = match job.server_name.as_deref() {
        None | Some("") => ServerName::default_server(),
        Some(name) => ServerName::parse(name)?,
    };
    Ok((user, server))
}
