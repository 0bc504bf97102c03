//! Jobs: the filtered, paged list, one job's detail, retry, cancel and bulk actions.

use std::collections::HashMap;

use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use maud::{Markup, html};
use schema::{JobRow, console::JobFilter, prelude::*};
use uuid::Uuid;

use super::{
    Form, Operator, badge, layout, page_error, page_of, pager, rows_or_page, say, time_of, when,
};
use crate::{
    AppState,
    auth::ClientAddr,
    jobs::{cancel_job, retry_job},
};

const PER_PAGE: i64 = 50;
/// The most jobs one bulk action over "all matching" touches.
const BULK_MAX: i64 = 10_000;
const KINDS: &[&str] = schema::JobKind::WORDS;
const STATES: &[&str] = schema::JobState::WORDS;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/jobs", get(list))
        .route("/jobs/bulk", post(bulk))
        .route("/jobs/{id}", get(detail))
        .route("/jobs/{id}/retry", post(retry))
        .route("/jobs/{id}/cancel", post(cancel))
}

/// The filter a query (or a bulk form) names; an unknown kind or state, or a time
/// that is not one, is refused with what was wrong.
fn filter_from(get: impl Fn(&str) -> Option<String>) -> Result<JobFilter, String> {
    let pick = |key: &str, allowed: &[&str]| -> Result<Option<String>, String> {
        match get(key).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) if allowed.contains(&v.as_str()) => Ok(Some(v)),
            Some(v) => Err(format!("{key} {v:?} is not one of {}", allowed.join(", "))),
        }
    };
    let time = |key: &str| time_of(key, get(key));
    Ok(JobFilter {
        kind: pick("kind", KINDS)?,
        state: pick("state", STATES)?,
        user: get("user").filter(|v| !v.is_empty()),
        since: time("since")?,
        until: time("until")?,
    })
}

async fn list(
    State(state): State<AppState>,
    operator: Operator,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let parsed = filter_from(|k| query.get(k).cloned()).and_then(|f| Ok((f, page_of(&query)?)));
    let (filter, page) = match parsed {
        Ok(v) => v,
        Err(message) => return page_error(StatusCode::BAD_REQUEST, "Bad filter", &message),
    };
    let jobs = match state
        .db
        .jobs_page(&filter, (page - 1) * PER_PAGE, PER_PAGE)
        .await
    {
        Ok(jobs) => jobs,
        Err(e) => return crate::error::ApiError::from(e).into_response(),
    };
    let rows = html! { @for job in &jobs.items { (job_row(job)) } };
    let value = |k: &str| query.get(k).cloned().unwrap_or_default();
    rows_or_page(&query, rows, |rows| {
        layout(
            "Jobs",
            &operator,
            &query,
            html! {
                form.filters method="get" action="/admin/jobs" {
                    label { "Kind" select name="kind" { option value="" { "any" } @for k in KINDS { option value=(k) selected[value("kind") == *k] { (k) } } } }
                    label { "State" select name="state" { option value="" { "any" } @for s in STATES { option value=(s) selected[value("state") == *s] { (s) } } } }
                    label { "User" input name="user" value=(value("user")) size="14"; }
                    label { "From (UTC)" input name="since" type="datetime-local" value=(value("since")); }
                    label { "To (UTC)" input name="until" type="datetime-local" value=(value("until")); }
                    button type="submit" { "Filter" }
                    a href="/admin/jobs" { "clear" }
                }
                form #bulk method="post" action="/admin/jobs/bulk" {
                    @for key in ["kind", "state", "user", "since", "until"] { input type="hidden" name=(format!("f_{key}")) value=(value(key)); }
                    div.actions {
                        select name="action" { option value="retry" { "Retry" } option value="cancel" { "Cancel" } }
                        button type="submit" name="scope" value="selected" { "the selected" }
                        button type="submit" name="scope" value="matching" data-confirm=(format!("Apply to all {} matching jobs?", jobs.total)) { "all " (jobs.total) " matching" }
                    }
                    table {
                        thead { tr { th { input type="checkbox" data-select-all; } th { "Job" } th { "Kind" } th { "State" } th { "User" } th { "Server" } th { "Tries" } th { "Created" } th { "Finished" } th { "Error" } } }
                        tbody data-live { (rows) }
                    }
                }
                (pager("/admin/jobs", &query, page, PER_PAGE, jobs.total))
            },
        )
    })
}

fn job_row(job: &JobRow) -> Markup {
    html! {
        tr data-job=(job.id) {
            td { input type="checkbox" name="ids" value=(job.id); }
            td { a href=(format!("/admin/jobs/{}", job.id)) { code.id { (job.id) } } }
            td { (job.kind) }
            td.state { (badge(job.state.as_str())) }
            td { (job.user_name) }
            td { (job.server_name.as_deref().unwrap_or("")) }
            td { (job.attempts) }
            td { (when(Some(job.created_at))) }
            td { (when(job.finished_at)) }
            td.error { @if let Some(error) = &job.last_error { (folded(error)) } }
        }
    }
}

/// A job id from the path, or the page that says it is not one.
fn job_id(raw: &str) -> Result<Uuid, Box<Response>> {
    Uuid::parse_str(raw).map_err(|_| {
        Box::new(page_error(
            StatusCode::BAD_REQUEST,
            "Bad job id",
            &format!("{raw:?} is not a job id"),
        ))
    })
}

/// An error as it was written (line breaks and indentation kept); one that runs
/// over a line shows its first line and unfolds to the rest.
pub(super) fn folded(error: &str) -> Markup {
    let first = error.lines().next().unwrap_or("");
    let short = first.chars().count() <= 120 && first.len() == error.trim_end().len();
    html! {
        @if short {
            (error)
        } @else {
            details.error {
                summary { (first.chars().take(120).collect::<String>()) "…" }
                pre { (error) }
            }
        }
    }
}

async fn detail(
    State(state): State<AppState>,
    operator: Operator,
    Path(raw): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let id = match job_id(&raw) {
        Ok(id) => id,
        Err(bad) => return *bad,
    };
    let job = match state.db.get_job(id).await {
        Ok(Some(job)) => job,
        Ok(None) => {
            return page_error(
                StatusCode::NOT_FOUND,
                "No such job",
                &format!("There is no job {id}."),
            );
        }
        Err(e) => return crate::error::ApiError::from(e).into_response(),
    };
    let events = if job.kind == schema::JobKind::Spawn {
        state.db.progress_after(id, 0).await.unwrap_or_default()
    } else {
        vec![]
    };
    let payload = serde_json::to_string_pretty(&job.payload).unwrap_or_default();
    let result = job
        .result
        .as_ref()
        .map(|r| serde_json::to_string_pretty(r).unwrap_or_default());
    layout("Jobs", &operator, &query, html! {
        h2 { (job.kind) " job " code { (job.id) } " " (badge(job.state.as_str())) }
        div.actions {
            @if matches!(job.state, schema::JobState::Failed | schema::JobState::Cancelled) {
                form method="post" action=(format!("/admin/jobs/{id}/retry")) { button #retry type="submit" { "Retry" } }
            }
            @if job.state == schema::JobState::Queued {
                form method="post" action=(format!("/admin/jobs/{id}/cancel")) { button #cancel type="submit" { "Cancel" } }
            }
        }
        dl {
            dt { "User" } dd { (job.user_name) }
            dt { "Server" } dd { (job.server_name.as_deref().unwrap_or("—")) }
            dt { "Attempts" } dd { (job.attempts) }
            dt { "Worker" } dd { (job.worker.as_deref().unwrap_or("—")) }
            dt { "Created" } dd { (when(Some(job.created_at))) " · " (job.created_at.to_rfc3339()) }
            dt { "Started" } dd { (when(job.started_at)) }
            dt { "Finished" } dd { (when(job.finished_at)) }
            dt { "Run time" } dd { @match (job.started_at, job.finished_at) { (Some(s), Some(f)) => { (format!("{:.3} s", (f - s).num_milliseconds() as f64 / 1000.0)) }, _ => { "—" } } }
            dt { "Last error" } dd.error { @match &job.last_error { Some(error) => pre { (error) }, None => "—" } }
            @if let Some(of) = job.retry_of { dt { "Retry of" } dd { a href=(format!("/admin/jobs/{of}")) { code { (of) } } } }
        }
        h3 { "Payload" } pre { (payload) }
        @if let Some(result) = result { h3 { "Result" } pre { (result) } }
        @if !events.is_empty() {
            h3 { "Progress" }
            table { thead { tr { th { "At" } th { "%" } th { "Message" } } } tbody {
                @for e in &events { tr { td { (e.created_at.format("%H:%M:%S%.3f")) } td { (e.progress) } td { (e.message) } } }
            } }
        }
    })
    .into_response()
}

async fn retry(
    State(state): State<AppState>,
    operator: Operator,
    addr: ClientAddr,
    Path(raw): Path<String>,
) -> Response {
    let id = match job_id(&raw) {
        Ok(id) => id,
        Err(bad) => return *bad,
    };
    match retry_job(&state, &operator.actor(), &addr, id).await {
        Ok(new) => operator.back(
            &format!("/admin/jobs/{}", new.id),
            Ok(format!("Retried as job {}", new.id)),
        ),
        Err(e) => operator.back(&format!("/admin/jobs/{id}"), Err(say(e))),
    }
}

async fn cancel(
    State(state): State<AppState>,
    operator: Operator,
    addr: ClientAddr,
    Path(raw): Path<String>,
) -> Response {
    let id = match job_id(&raw) {
        Ok(id) => id,
        Err(bad) => return *bad,
    };
    match cancel_job(&state, &operator.actor(), &addr, id).await {
        Ok(_) => operator.back(&format!("/admin/jobs/{id}"), Ok("Cancelled".into())),
        Err(e) => operator.back(&format!("/admin/jobs/{id}"), Err(say(e))),
    }
}

/// Retry or cancel the selected jobs, or every job matching the list's filter.
async fn bulk(
    State(state): State<AppState>,
    operator: Operator,
    addr: ClientAddr,
    body: Bytes,
) -> Response {
    let form = match Form::parse(&body) {
        Ok(form) => form,
        Err(bad) => return bad.into_response(),
    };
    let filter = match filter_from(|k| form.get(&format!("f_{k}")).map(str::to_owned)) {
        Ok(f) => f,
        Err(message) => return operator.back("/admin/jobs", Err(message)),
    };
    let list = {
        let q: Vec<(String, String)> = ["kind", "state", "user", "since", "until"]
            .iter()
            .filter_map(|k| {
                form.get(&format!("f_{k}"))
                    .map(|v| ((*k).to_owned(), v.to_owned()))
            })
            .collect();
        format!(
            "/admin/jobs?{}",
            serde_urlencoded::to_string(&q).unwrap_or_default()
        )
    };
    let ids: Vec<Uuid> = match form.get("scope") {
        Some("matching") => match state.db.job_ids(&filter, BULK_MAX).await {
            Ok(ids) => ids,
            Err(e) => return operator.back(&list, Err(say(e.into()))),
        },
        _ => form
            .all("ids")
            .iter()
            .filter_map(|v| Uuid::parse_str(v).ok())
            .collect(),
    };
    if ids.is_empty() {
        return operator.back(&list, Err("no jobs were selected".into()));
    }
    let action = form.get("action").unwrap_or("retry");
    let (mut done, mut skipped) = (0, 0);
    let mut reasons: Vec<String> = vec![];
    for id in ids {
        let outcome = match action {
            "cancel" => cancel_job(&state, &operator.actor(), &addr, id)
                .await
                .map(|_| ()),
            _ => retry_job(&state, &operator.actor(), &addr, id)
                .await
                .map(|_| ()),
        };
        match outcome {
            Ok(()) => done += 1,
            Err(e) => {
                skipped += 1;
                let reason = say(e);
                if reasons.len() < 3 && !reasons.contains(&reason) {
                    reasons.push(reason);
                }
            }
        }
    }
    let verb = if action == "cancel" {
        "Cancelled"
    } else {
        "Retried"
    };
    let mut text = format!("{verb} {done} jobs");
    if skipped > 0 {
        text += &format!("; skipped {skipped} ({})", reasons.join("; "));
    }
    operator.back(&list, Ok(text))
}

#[cfg(test)]
mod tests {
    use super::folded;

    #[test]
    fn long_errors_fold_and_keep_their_lines() {
        assert_eq!(folded("image not found").into_string(), "image not found");
        let trace = "spawn failed: the container exited\n  at line 1\n    <module>";
        let html = folded(trace).into_string();
        assert!(
            html.starts_with("<details class=\"error\"><summary>spawn failed: the container exited…</summary><pre>"),
            "{html}"
        );
        assert!(
            html.contains("exited\n  at line 1\n    &lt;module&gt;</pre>"),
            "{html}"
        );
    }
}
