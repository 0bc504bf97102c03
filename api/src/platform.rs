//! `/api/v1/admin/limits` and `/api/v1/admin/workers`: the platform's limits, their
//! use, and the workers that carry the jobs. Admins only.

use axum::{Json, extract::State};
use chrono::{DateTime, Utc};
use schema::{
    Limits,
    maintenance::ScheduleView,
    platform::{LimitChange, Usage},
    prelude::*,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    auth::{ClientAddr, Principal},
    body::JsonBody,
    error::{ApiError, ApiResult},
    openapi::Errors,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(limits, change_limits))
        .routes(routes!(workers))
        .routes(routes!(schedules))
        .routes(routes!(run_schedule))
}

/// The limits in force, where they come from, and how much of them is in use.
#[derive(Debug, Clone, Serialize, ToSchema)]
struct LimitsView {
    /// Spawns in flight at once, platform-wide.
    concurrent_spawn_limit: u32,
    /// Servers pending or running at once, platform-wide.
    active_server_limit: u32,
    /// The limits of the configuration.
    configured: Limits,
    /// Which limits an admin set at runtime.
    overridden: Overridden,
    updated_at: Option<DateTime<Utc>>,
    updated_by: Option<String>,
    usage: Usage,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
struct Overridden {
    concurrent_spawn_limit: bool,
    active_server_limit: bool,
}

/// The platform's limits and their use.
#[utoipa::path(get, path = "/admin/limits", tag = "admin",
    responses((status = 200, description = "The limits", body = LimitsView), Errors))]
async fn limits(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<LimitsView>> {
    principal.require("admin")?;
    limits_view(&state).await.map(Json)
}

async fn limits_view(state: &AppState) -> ApiResult<LimitsView> {
    let overrides = state.db.limit_overrides().await?;
    let configured = state.db.configured_limits();
    let effective = overrides.apply(configured);
    let usage = state.db.usage().await?;
    Ok(LimitsView {
        concurrent_spawn_limit: effective.concurrent_spawn_limit,
        active_server_limit: effective.active_server_limit,
        configured,
        overridden: Overridden {
            concurrent_spawn_limit: overrides.concurrent_spawn_limit.is_some(),
            active_server_limit: overrides.active_server_limit.is_some(),
        },
        updated_at: overrides.updated_at,
        updated_by: overrides.updated_by,
        usage,
    })
}

/// A positive number sets a limit; `null` resets it to the configuration.
/// At least one of the two.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct LimitsBody {
    /// 1 to 100000, or `null` for the configured one.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 100_000)]
    concurrent_spawn_limit: Option<Option<i64>>,
    /// 1 to 100000, or `null` for the configured one.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 100_000)]
    active_server_limit: Option<Option<i64>>,
}

/// Tells a field that is `null` from one that is absent.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    crate::body::whole_or_none(d).map(Some)
}

fn to_change(name: &str, value: Option<Option<i64>>) -> ApiResult<LimitChange> {
    Ok(match value {
        None => LimitChange::Keep,
        Some(None) => LimitChange::Reset,
        Some(Some(v)) if (1..=100_000).contains(&v) => LimitChange::Set(v as i32),
        Some(Some(v)) => {
            return Err(ApiError::BadRequest(format!(
                "{name} must be between 1 and 100000, got {v}"
            )));
        }
    })
}

/// Takes effect without restarts: the API admits by the new limit at once, and
/// workers read it within a second.
#[utoipa::path(patch, path = "/admin/limits", tag = "admin", request_body = LimitsBody,
    responses((status = 200, description = "The limits now", body = LimitsView), Errors))]
async fn change_limits(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    JsonBody(body): JsonBody<LimitsBody>,
) -> ApiResult<Json<LimitsView>> {
    principal.require("admin")?;
    let spawn = to_change("concurrent_spawn_limit", body.concurrent_spawn_limit)?;
    let active = to_change("active_server_limit", body.active_server_limit)?;
    if matches!((spawn, active), (LimitChange::Keep, LimitChange::Keep)) {
        return Err(ApiError::BadRequest(
            "change concurrent_spawn_limit or active_server_limit (null resets one)".into(),
        ));
    }
    let actor = principal.actor();
    let overrides = state.db.set_limits(spawn, active, &actor).await?;
    let limits = overrides.apply(state.db.configured_limits());
    state
        .db
        .ensure_admission_places(limits.active_server_limit)
        .await?;
    let view = limits_view(&state).await?;
    state
        .audit(
            Some(&actor),
            "limits_changed",
            None,
            &addr,
            serde_json::to_value(&view).unwrap_or_default(),
        )
        .await;
    Ok(Json(view))
}

/// A worker as it last reported.
#[derive(Debug, Serialize, ToSchema)]
struct WorkerView {
    name: String,
    host: String,
    pid: i32,
    /// `postgres`, `nats` or `sqlite`: where it takes jobs from.
    backend: String,
    version: String,
    started: DateTime<Utc>,
    last_seen: DateTime<Utc>,
    jobs_in_flight: i32,
    stopped: Option<DateTime<Utc>>,
    /// Seen within the heartbeat's grace and not stopped.
    alive: bool,
}

#[derive(Debug, Serialize, ToSchema)]
struct Workers {
    workers: Vec<WorkerView>,
}

/// The workers that registered, alive or not.
#[utoipa::path(get, path = "/admin/workers", tag = "admin",
    responses((status = 200, description = "The workers", body = Workers), Errors))]
async fn workers(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<Workers>> {
    principal.require("admin")?;
    let now = Utc::now();
    let workers = state
        .db
        .list_workers()
        .await?
        .into_iter()
        .map(|w| WorkerView {
            alive: crate::metrics::worker_alive(&w, now),
            name: w.name,
            host: w.host,
            pid: w.pid,
            backend: w.backend,
            version: w.version,
            started: w.started_at,
            last_seen: w.last_seen,
            jobs_in_flight: w.jobs_in_flight,
            stopped: w.stopped_at,
        })
        .collect();
    Ok(Json(Workers { workers }))
}

#[derive(Debug, Serialize, ToSchema)]
struct Schedules {
    schedules: Vec<ScheduleView>,
}

/// A job that was enqueued.
#[derive(Debug, Serialize, ToSchema)]
struct Enqueued {
    job_id: uuid::Uuid,
}

/// Each schedule: its expression, next run, and its latest run with the job's state
/// and result.
#[utoipa::path(get, path = "/admin/schedules", tag = "admin",
    responses((status = 200, description = "The schedules", body = Schedules), Errors))]
async fn schedules(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Schedules>> {
    principal.require("admin")?;
    let schedules = state.db.schedules().await?;
    Ok(Json(Schedules { schedules }))
}

/// Runs a schedule now (its job, with the settings the scheduler registered): 202
/// with the job id.
#[utoipa::path(post, path = "/admin/schedules/{name}/run", tag = "admin",
    params(("name" = String, Path, description = "The schedule's name")),
    responses((status = 202, description = "The job", body = Enqueued), Errors))]
async fn run_schedule(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> ApiResult<(axum::http::StatusCode, Json<Enqueued>)> {
    principal.require("admin")?;
    let job = state
        .db
        .enqueue_tick(&name, Utc::now(), true)
        .await?
        .ok_or_else(|| ApiError::Conflict(format!("schedule {name:?} was just run")))?;
    state
        .audit(
            Some(&principal.actor()),
            "schedule_run",
            Some(&name),
            &addr,
            json!({ "job_id": job }),
        )
        .await;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(Enqueued { job_id: job }),
    ))
}
