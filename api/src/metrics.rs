//! `GET /metrics` in Prometheus's text format: this process's counters (HTTP
//! requests, and the jobs it enqueued, began and ended) and the platform's gauges,
//! read from the database at scrape time (queue depth, spawn slots, active servers,
//! workers alive), so every API process reports the same platform-wide figures.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderMap, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use chrono::Utc;
use utoipa_axum::{router::OpenApiRouter, routes};

use schema::prelude::*;

use crate::{
    AppState,
    auth::same_secret,
    error::{ApiError, ApiResult},
    openapi::Errors,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(render))
}

/// Records every request's duration by method, route template and status.
pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(
        "berth_http_request_duration_seconds",
        "method" => method, "route" => route, "status" => status
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// The metrics, for Prometheus. Open unless `BERTH_METRICS_TOKEN` is set; then that
/// token as a bearer.
#[utoipa::path(get, path = "/metrics", tag = "health", security((), ("bearer" = [])),
    responses((status = 200, description = "Prometheus's text format",
        content_type = "text/plain", body = String), Errors))]
async fn render(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    if let Some(expected) = &state.config.metrics_token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !same_secret(given, expected) {
            return Err(ApiError::Unauthorized(
                "send Authorization: Bearer <BERTH_METRICS_TOKEN>".into(),
            ));
        }
    }
    platform_gauges(&state).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response())
}

async fn platform_gauges(state: &AppState) -> ApiResult<()> {
    let limits = state.limits().await?;
    let usage = state.db.usage().await?;
    metrics::gauge!("berth_spawn_slots_in_use").set(usage.spawns_in_flight as f64);
    metrics::gauge!("berth_spawn_slot_limit").set(f64::from(limits.concurrent_spawn_limit));
    metrics::gauge!("berth_active_servers").set(usage.active_servers as f64);
    metrics::gauge!("berth_active_server_limit").set(f64::from(limits.active_server_limit));
    metrics::gauge!("berth_spawns_waiting").set(usage.waiting_spawns as f64);
    let mut depth = [
        (schema::jobs::SPAWN_QUEUE, 0i64),
        (schema::jobs::CONTROL_QUEUE, 0),
    ];
    for count in state.db.job_counts().await? {
        if count.state == schema::JobState::Queued
            && let Some(entry) = depth.iter_mut().find(|(q, _)| *q == count.kind.queue())
        {
            entry.1 += count.count;
        }
    }
    for (queue, jobs) in depth {
        metrics::gauge!("berth_queue_depth", "queue" => queue).set(jobs as f64);
    }
    let now = Utc::now();
    let alive = state
        .db
        .list_workers()
        .await?
        .iter()
        .filter(|w| worker_alive(w, now))
        .count();
    metrics::gauge!("berth_workers_alive").set(alive as f64);
    Ok(())
}

/// A worker that has not stopped and was heard from within the last minute.
pub fn worker_alive(w: &schema::platform::WorkerRow, now: chrono::DateTime<Utc>) -> bool {
    w.stopped_at.is_none() && (now - w.last_seen).num_seconds() < 60
}
