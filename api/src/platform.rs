//! `/api/v1/admin/limits` and `/api/v1/admin/workers`: the platform's limits, their
//! use, and the workers that carry the jobs. Admins only.

use axum::{Json, Router, extract::State, routing::get};
use chrono::Utc;
use schema::{platform::LimitChange, prelude::*};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    AppState,
    auth::{ClientAddr, Principal},
    body::JsonBody,
    error::{ApiError, ApiResult},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/limits", get(limits).patch(change_limits))
        .route("/admin/workers", get(workers))
        .route("/admin/schedules", get(schedules))
        .route(
            "/admin/schedules/{name}/run",
            axum::routing::post(run_schedule),
        )
}

async fn limits(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<Value>> {
    principal.require("admin")?;
    limits_view(&state).await.map(Json)
}

async fn limits_view(state: &AppState) -> ApiResult<Value> {
    let overrides = state.db.limit_overrides().await?;
    let configured = state.db.configured_limits();
    let effective = overrides.apply(configured);
    let usage = state.db.usage().await?;
    Ok(json!({
        "concurrent_spawn_limit": effective.concurrent_spawn_limit,
        "active_server_limit": effective.active_server_limit,
        "configured": configured,
        "overridden": {
            "concurrent_spawn_limit": overrides.concurrent_spawn_limit.is_some(),
            "active_server_limit": overrides.active_server_limit.is_some(),
        },
        "updated_at": overrides.updated_at,
        "updated_by": overrides.updated_by,
        "usage": usage,
    }))
}

/// A positive number sets a limit; `null` resets it to the configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsBody {
    #[serde(default, deserialize_with = "present")]
    concurrent_spawn_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    active_server_limit: Option<Option<i64>>,
}

/// Tells a field that is `null` from one that is absent.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    Option::<i64>::deserialize(d).map(Some)
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
async fn change_limits(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    JsonBody(body): JsonBody<LimitsBody>,
) -> ApiResult<Json<Value>> {
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
        .audit(Some(&actor), "limits_changed", None, &addr, view.clone())
        .await;
    Ok(Json(view))
}

async fn workers(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<Value>> {
    principal.require("admin")?;
    let now = Utc::now();
    let workers: Vec<Value> = state
        .db
        .list_workers()
        .await?
        .into_iter()
        .map(|w| {
            json!({
                "name": w.name, "host": w.host, "pid": w.pid, "backend": w.backend, "version": w.version,
                "started": w.started_at, "last_seen": w.last_seen, "jobs_in_flight": w.jobs_in_flight,
                "stopped": w.stopped_at,
                "alive": crate::metrics::worker_alive(&w, now),
            })
        })
        .collect();
    Ok(Json(json!({ "workers": workers })))
}

/// Each schedule: its expression, next run, and its latest run with the job's state
/// and result.
async fn schedules(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<Value>> {
    principal.require("admin")?;
    let schedules = state.db.schedules().await?;
    Ok(Json(json!({ "schedules": schedules })))
}

/// Runs a schedule now (its job, with the settings the scheduler registered): 202
/// with the job id.
async fn run_schedule(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> ApiResult<(axum::http::StatusCode, Json<Value>)> {
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
        Json(json!({ "job_id": job })),
    ))
}
