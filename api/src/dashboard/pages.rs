//! The overview, servers, workers, schedules, users and the audit log.

use std::collections::HashMap;

use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::Utc;
use maud::html;
use schema::{
    Role, ServerName, ServerState, SpawnOutcome, StopOutcome, UserName, accounts::AuditFilter,
    console::ServerFilter, prelude::*,
};
use serde_json::{Value, json};

use super::{
    Form, Operator, badge, layout, page_error, page_of, pager, rows_or_page, say, snapshot,
    time_of, when,
};
use crate::{
    AppState,
    auth::{ClientAddr, Principal},
    error::ApiError,
};

const PER_PAGE: i64 = 50;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/servers", get(servers))
        .route("/servers/stop", post(stop_server))
        .route("/servers/stop-idle", post(stop_idle))
        .route("/workers", get(workers))
        .route("/schedules", get(schedules))
        .route("/schedules/{name}/run", post(run_schedule))
        .route("/users", get(users).post(add_user))
        .route("/users/{name}", get(user_page).post(change_user))
        .route("/users/{name}/servers/start", post(start_server))
        .route("/users/{name}/log", get(server_log))
        .route("/users/{name}/delete", post(delete_user))
        .route("/users/{name}/identities/link", post(link_identity))
        .route("/users/{name}/identities/unlink", post(unlink_identity))
        .route("/audit", get(audit))
}

fn failure(e: impl Into<ApiError>) -> Response {
    e.into().into_response()
}

pub async fn overview(
    State(state): State<AppState>,
    operator: Operator,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let snap = match snapshot(&state).await {
        Ok(s) => s,
        Err(e) => return failure(e),
    };
    let window = super::charts::Window::parse(query.get("chart").map(String::as_str));
    let charts = match super::charts::section(&state, window).await {
        Ok(c) => c,
        Err(e) => return failure(e),
    };
    let n = |v: &Value| v.as_i64().unwrap_or(0);
    let states = schema::JobState::WORDS;
    let queues = [schema::jobs::SPAWN_QUEUE, schema::jobs::CONTROL_QUEUE];
    layout("Overview", &operator, &query, html! {
        section.cards {
            div.card { h2 { "Spawn slots" } p.big { span data-stat="spawn_slots/in_use" { (n(&snap["spawn_slots"]["in_use"])) } " of " span data-stat="spawn_slots/limit" { (n(&snap["spawn_slots"]["limit"])) } } p.muted { span data-stat="waiting_spawns" { (n(&snap["waiting_spawns"])) } " spawns waiting" } }
            div.card { h2 { "Active servers" } p.big { span data-stat="active_servers/count" { (n(&snap["active_servers"]["count"])) } " of " span data-stat="active_servers/limit" { (n(&snap["active_servers"]["limit"])) } } p.muted { span data-stat="servers/running" { (n(&snap["servers"]["running"])) } " running" } }
            div.card { h2 { "Workers alive" } p.big data-stat="workers_alive" { (n(&snap["workers_alive"])) } p.muted { a href="/admin/workers" { "see workers" } } }
            div.card { h2 { "Failures, last hour" } p.big data-stat="failures_last_hour" { (n(&snap["failures_last_hour"])) } p.muted { a href="/admin/jobs?state=failed" { "see failed jobs" } } }
        }
        h2 { "Jobs by queue and state" }
        table #queues {
            thead { tr { th { "Queue" } @for s in states { th { (s) } } } }
            tbody {
                @for q in queues {
                    tr { th { (q) } @for s in states { td data-stat=(format!("queues/{q}/{s}")) { (n(&snap["queues"][q][s])) } } }
                }
            }
        }
        (charts)
    })
    .into_response()
}

async fn servers(
    State(state): State<AppState>,
    operator: Operator,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let page = match page_of(&query) {
        Ok(p) => p,
        Err(message) => return page_error(StatusCode::BAD_REQUEST, "Bad page", &message),
    };
    let filter = ServerFilter {
        state: query.get("state").filter(|s| !s.is_empty()).cloned(),
        user: query.get("user").filter(|s| !s.is_empty()).cloned(),
        profile: query.get("profile").filter(|s| !s.is_empty()).cloned(),
    };
    if let Some(s) = &filter.state
        && schema::ServerState::parse(s).is_none()
    {
        return page_error(
            StatusCode::BAD_REQUEST,
            "Bad filter",
            &format!("{s:?} is not a server state"),
        );
    }
    let listing = match state
        .db
        .servers_page(&filter, (page - 1) * PER_PAGE, PER_PAGE)
        .await
    {
        Ok(l) => l,
        Err(e) => return failure(e),
    };
    // Operators see both: where users reach a server, and where it runs.
    let addresses = state.public_addresses();
    let rows = html! {
        @for l in &listing.items {
            @let s = &l.server;
            tr data-server=(format!("{}/{}", s.user_name, s.name)) {
                td { (s.user_name) }
                td { @if s.name.is_empty() { span.muted { "(default)" } } @else { (s.name) } }
                td.state { (badge(s.state.as_str())) }
                td { (when(s.started_at)) }
                td { (when(s.last_activity)) }
                @let public = addresses.public(&s.user_name, &s.name);
                td.address {
                    a href=(public) { (public.strip_prefix(addresses.origin).unwrap_or(&public)) }
                    @if let Some(internal) = &s.url { br; code { (internal) } }
                }
                td { code { (s.container_id.as_deref().map_or("—", |c| &c[..c.len().min(12)])) } }
                td { (s.image.clone().or_else(|| s.profile_definition().and_then(|p| p.image)).as_deref().unwrap_or("default")) }
                td { @if let Some(p) = &s.profile { a href=(format!("/admin/servers?profile={}", super::encode(p))) { (p) } } @else { span.muted { "—" } } }
                td { @match (l.mem_limit, l.cpu_limit) { (Some(m), Some(c)) => { (format!("{} MiB, {c} CPU", m / (1 << 20))) }, _ => { "—" } } }
                td.error { (s.warning.as_deref().or(s.error.as_deref()).unwrap_or("")) }
                td {
                    @if matches!(s.state, ServerState::Running | ServerState::PendingSpawn) {
                        form method="post" action="/admin/servers/stop" {
                            input type="hidden" name="user" value=(s.user_name);
                            input type="hidden" name="server" value=(s.name);
                            button type="submit" { "Stop" }
                        }
                    }
                }
            }
        }
    };
    let value = |k: &str| query.get(k).cloned().unwrap_or_default();
    rows_or_page(&query, rows, |rows| {
        layout(
            "Servers",
            &operator,
            &query,
            html! {
                form.filters method="get" action="/admin/servers" {
                    label { "State" select name="state" { option value="" { "any" } @for st in schema::ServerState::WORDS { option value=(st) selected[value("state") == *st] { (st) } } } }
                    label { "User" input name="user" value=(value("user")) size="14"; }
                    label { "Profile" input name="profile" value=(value("profile")) size="12"; }
                    button type="submit" { "Filter" }
                }
                form.actions method="post" action="/admin/servers/stop-idle" data-confirm="Stop every server idle that long?" {
                    label { "Stop every server idle for more than " input name="minutes" type="number" min="1" value="60" size="5"; " minutes" }
                    button type="submit" { "Stop idle servers" }
                }
                table {
                    thead { tr { th { "Owner" } th { "Server" } th { "State" } th { "Started" } th { "Last activity" } th { "Address" } th { "Container" } th { "Image" } th { "Profile" } th { "Limits" } th { "Note" } th {} } }
                    tbody data-live { (rows) }
                }
                (pager("/admin/servers", &query, page, PER_PAGE, listing.total))
            },
        )
    })
}

async fn stop_server(
    State(state): State<AppState>,
    operator: Operator,
    addr: ClientAddr,
    body: Bytes,
) -> Response {
    let form = match Form::parse(&body) {
        Ok(f) => f,
        Err(bad) => return bad.into_response(),
    };
    let names = UserName::parse(form.get("user").unwrap_or_default()).and_then(|u| {
        let server = match form.get("server") {
            None => ServerName::default_server(),
            Some(name) => ServerName::parse(name)?,
        };
        Ok((u, server))
    });
    let (user, server) = match names {
        Ok(n) => n,
        Err(e) => return operator.back("/admin/servers", Err(e.to_string())),
    };
    match crate::servers::request_stop(&state, &operator.actor(), &addr, &user, &server).await {
        Ok(outcome) => {
            let text = match outcome {
                StopOutcome::Enqueued(_) => {
                    format!("Stopping {user}'s server {:?}", server.as_str())
                }
                StopOutcome::AlreadyStopping(_) => "That server is stopping already".into(),
                StopOutcome::NotRunning(row) => format!("That server is {} already", row.state),
            };
            operator.back("/admin/servers", Ok(text))
        }
        Err(e) => operator.back("/admin/servers", Err(say(e))),
    }
}

async fn stop_idle(
    State(state): State<AppState>,
    operator: Operator,
    addr: ClientAddr,
    body: Bytes,
) -> Response {
    let form = match Form::parse(&body) {
        Ok(f) => f,
        Err(bad) => return bad.into_response(),
    };
    let Some(minutes) = form
        .get("minutes")
        .and_then(|m| m.parse::<i64>().ok())
        .filter(|m| (1..=525_600).contains(m))
    else {
        return operator.back(
            "/admin/servers",
            Err("give the idle time in whole minutes, at least 1".into()),
        );
    };
    let before = Utc::now() - chrono::Duration::minutes(minutes);
    let idle = match state.db.idle_servers(before, false).await {
        Ok(idle) => idle,
        Err(e) => return operator.back("/admin/servers", Err(say(e.into()))),
    };
    let mut stopped = 0;
    for server in &idle {
        let Ok((user, name)) = UserName::parse(&server.user_name).and_then(|u| {
            Ok((
                u,
                if server.name.is_empty() {
                    ServerName::default_server()
                } else {
                    ServerName::parse(&server.name)?
                },
            ))
        }) else {
            continue;
        };
        let actor = operator.actor();
        if let Ok(StopOutcome::Enqueued(_)) =
            crate::servers::request_stop(&state, &actor, &addr, &user, &name).await
        {
            stopped += 1;
        }
    }
    state
        .audit(
            Some(&operator.actor()),
            "idle_servers_stopped",
            None,
            &addr,
            json!({ "idle_minutes": minutes, "stopped": stopped }),
        )
        .await;
    operator.back(
        "/admin/servers",
        Ok(format!(
            "Stopping {stopped} servers idle for more than {minutes} minutes"
        )),
    )
}

async fn workers(
    State(state): State<AppState>,
    operator: Operator,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let list = match state.db.list_workers().await {
        Ok(l) => l,
        Err(e) => return failure(e),
    };
    let now = Utc::now();
    let rows = html! {
        @for w in &list {
            tr {
                td { (w.name) } td { (w.host) } td { (w.pid) } td { (w.backend) } td { (w.version) }
                td { (when(Some(w.started_at))) } td { (when(Some(w.last_seen))) } td { (w.jobs_in_flight) }
                td { @if crate::metrics::worker_alive(w, now) { (badge("alive")) } @else if w.stopped_at.is_some() { (badge("stopped")) } @else { (badge("silent")) } }
            }
        }
    };
    rows_or_page(&query, rows, |rows| {
        layout(
            "Workers",
            &operator,
            &query,
            html! {
                table {
                    thead { tr { th { "Worker" } th { "Host" } th { "PID" } th { "Backend" } th { "Version" } th { "Started" } th { "Last heartbeat" } th { "Jobs in flight" } th { "State" } } }
                    tbody data-live { (rows) }
                }
            },
        )
    })
}

async fn schedules(
    State(state): State<AppState>,
    operator: Operator,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let list = match state.db.schedules().await {
        Ok(l) => l,
        Err(e) => return failure(e),
    };
    let rows = html! {
        @for s in &list {
            tr {
                td { (s.name) } td { code { (s.expression) } } td { (s.kind) }
                td { (when(s.last_run_at)) }
                td { @if let Some(st) = &s.last_state { @if let Some(id) = s.last_job_id { a href=(format!("/admin/jobs/{id}")) { (badge(st)) } } } }
                td { @if let Some(r) = &s.last_result { code { (r.to_string()) } } @if let Some(e) = &s.last_error { span.error { (e) } } }
                td { (when(s.next_run_at)) }
                td { form method="post" action=(format!("/admin/schedules/{}/run", s.name)) { button type="submit" { "Run now" } } }
            }
        }
    };
    rows_or_page(&query, rows, |rows| {
        layout(
            "Schedules",
            &operator,
            &query,
            html! {
                @if list.is_empty() { p.muted { "No scheduler has registered its schedules yet: start " code { "berth scheduler" } "." } }
                table {
                    thead { tr { th { "Schedule" } th { "When" } th { "Job" } th { "Last run" } th { "State" } th { "Result" } th { "Next run" } th {} } }
                    tbody data-live { (rows) }
                }
            },
        )
    })
}

async fn run_schedule(
    State(state): State<AppState>,
    operator: Operator,
    addr: ClientAddr,
    Path(name): Path<String>,
) -> Response {
    match state.db.enqueue_tick(&name, Utc::now(), true).await {
        Ok(Some(job)) => {
            state
                .audit(
                    Some(&operator.actor()),
                    "schedule_run",
                    Some(&name),
                    &addr,
                    json!({ "job_id": job }),
                )
                .await;
            operator.back(
                "/admin/schedules",
                Ok(format!("{name} enqueued as job {job}")),
            )
        }
        Ok(None) => operator.back("/admin/schedules", Err(format!("{name} was just run"))),
        Err(e) => operator.back("/admin/schedules", Err(say(e.into()))),
    }
}

async fn users(
    State(state): State<AppState>,
    operator: Operator,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let page = match page_of(&query) {
        Ok(p) => p,
        Err(message) => return page_error(StatusCode::BAD_REQUEST, "Bad page", &message),
    };
    let q = query.get("q").filter(|q| !q.is_empty()).cloned();
    if q.as_ref().is_some_and(|q| q.chars().count() > 200) {
        return page_error(
            StatusCode::BAD_REQUEST,
            "Search too long",
            "Search for at most 200 characters.",
        );
    }
    let list = match state
        .db
        .users_page(q.as_deref(), (page - 1) * PER_PAGE, PER_PAGE)
        .await
    {
        Ok(l) => l,
        Err(e) => return failure(e),
    };
    let rows = html! {
        @for u in &list.items {
            tr data-user=(u.name) {
                td { a href=(format!("/admin/users/{}", u.name)) { (u.name) } } td { (u.email.as_deref().unwrap_or("")) } td { (badge(u.role.as_str())) }
                td { @if u.active { (badge("active")) } @else { (badge("deactivated")) } }
                td { (when(Some(u.created_at))) } td { (when(u.last_activity)) }
                td.actions {
                    form method="post" action=(format!("/admin/users/{}", u.name)) {
                        @if u.is_admin() { button name="role" value="user" { "Make user" } } @else { button name="role" value="admin" { "Make admin" } }
                        @if u.active { button name="active" value="false" data-confirm="Deactivate this account? Its sessions end." { "Deactivate" } } @else { button name="active" value="true" { "Activate" } }
                    }
                    form method="post" action=(format!("/admin/users/{}/delete", u.name)) data-confirm=(format!("Delete {} with their servers and files?", u.name)) {
                        button.danger { "Delete" }
                    }
                }
            }
        }
    };
    rows_or_page(&query, rows, |rows| {
        layout(
            "Users",
            &operator,
            &query,
            html! {
                form.filters method="get" action="/admin/users" {
                    label { "Search" input name="q" value=(q.clone().unwrap_or_default()) placeholder="name or email"; }
                    button type="submit" { "Search" }
                }
                details.add-user {
                    summary { "Add a user" }
                    form.filters #add-user method="post" action="/admin/users" {
                        label { "Name" input name="username" required size="16" autocomplete="off"; }
                        label { "Email" input name="email" type="email" size="20"; }
                        label { "Password" input name="password" type="password" size="16" autocomplete="new-password" placeholder="none: a portal logs them in"; }
                        label { "Role" select name="role" { option value="user" { "user" } option value="admin" { "admin" } } }
                        button type="submit" { "Add" }
                    }
                }
                table {
                    thead { tr { th { "User" } th { "Email" } th { "Role" } th { "Account" } th { "Created" } th { "Last activity" } th {} } }
                    tbody data-live { (rows) }
                }
                (pager("/admin/users", &query, page, PER_PAGE, list.total))
            },
        )
    })
}

/// One user: their servers (open, start, stop), recent jobs and sessions.
async fn user_page(
    State(state): State<AppState>,
    operator: Operator,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Ok(name) = UserName::parse(&name) else {
        return page_error(
            StatusCode::NOT_FOUND,
            "No such user",
            "That is not a user's name.",
        );
    };
    let user = match state.db.get_user(&name).await {
        Ok(Some(u)) => u,
        Ok(None) => {
            return page_error(
                StatusCode::NOT_FOUND,
                "No such user",
                &format!("There is no user named {:?}.", name.as_str()),
            );
        }
        Err(e) => return failure(e),
    };
    let filter = schema::console::JobFilter {
        user: Some(user.name.clone()),
        ..Default::default()
    };
    let ids = [user.id];
    let (servers, jobs, sessions, identities) = match tokio::try_join!(
        state.db.servers_of(&ids),
        state.db.jobs_page(&filter, 0, 20),
        state.db.sessions_of(user.id),
        state.db.identities_of(user.id),
    ) {
        Ok(all) => all,
        Err(e) => return failure(e),
    };
    let seen = state.addresses(&operator.principal);
    let u = &user.name;
    let offered: Vec<schema::profiles::Profile> = match state.profiles.all(&state.db).await {
        Ok(all) => all.values().filter(|p| p.allows(&user)).cloned().collect(),
        Err(e) => return failure(e),
    };
    let groups = user.groups().join(", ");
    // Only the account's own user links an identity to it: they prove both.
    let own = matches!(&operator.principal, Principal::User { user: me, .. } if me.id == user.id);
    layout(
        &format!("User {u}"),
        &operator,
        &query,
        html! {
            p.muted {
                (user.email.as_deref().unwrap_or("no email")) " · " (badge(user.role.as_str())) " · "
                @if user.active { (badge("active")) } @else { (badge("deactivated")) }
                " · created " (when(Some(user.created_at))) " · last active " (when(user.last_activity))
            }
            h2 { "Servers" }
            table #user-servers {
                thead { tr { th { "Server" } th { "State" } th { "Spawner" } th { "Image" } th { "Started" } th { "Last activity" } th { "Error" } th {} } }
                tbody {
                    @for s in &servers {
                        @let label = if s.name.is_empty() { "(default)" } else { s.name.as_str() };
                        tr data-server=(format!("{u}/{}", s.name)) {
                            td { (label) }
                            td.state { (badge(s.state.as_str())) }
                            td { (s.spawner.as_deref().unwrap_or("")) }
                            td { (s.image.as_deref().unwrap_or("default")) }
                            td { (when(s.started_at)) }
                            td { (when(s.last_activity)) }
                            td.error { @if let Some(e) = &s.error { (super::jobs::folded(e)) } }
                            td.actions {
                                @if s.state == ServerState::Running {
                                    a href=(seen.public(u, &s.name)) target="_blank" rel="noopener" { "open" } " "
                                }
                                @if state.config.server_logs.is_some() {
                                    a href=(format!("/admin/users/{u}/log?server={}", s.name)) { "log" } " "
                                }
                                @if matches!(s.state, ServerState::Running | ServerState::PendingSpawn) {
                                    form method="post" action="/admin/servers/stop" {
                                        input type="hidden" name="user" value=(u);
                                        @if !s.name.is_empty() { input type="hidden" name="server" value=(s.name); }
                                        button { "Stop" }
                                    }
                                }
                                @if matches!(s.state, ServerState::Stopped | ServerState::Failed) {
                                    form method="post" action=(format!("/admin/users/{u}/servers/start")) {
                                        @if !s.name.is_empty() { input type="hidden" name="server" value=(s.name); }
                                        button { "Start" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            form.filters #start-server method="post" action=(format!("/admin/users/{u}/servers/start")) {
                label { "Start a server named" input name="server" size="14" placeholder="(default)"; }
                @if !offered.is_empty() {
                    label { "with profile" select name="profile" {
                        option value="" { "(as before, or the default)" }
                        @for p in &offered { option value=(p.name) { (p.display_name.as_deref().unwrap_or(&p.name)) } }
                    } }
                }
                button type="submit" { "Start" }
            }
            form.filters #groups method="post" action=(format!("/admin/users/{u}")) {
                label { "Groups (for profiles)" input name="groups" value=(groups) size="30" placeholder="lab, course-101"; }
                input type="hidden" name="set_groups" value="1";
                button type="submit" { "Save groups" }
            }
            @if !identities.is_empty() || (own && state.oidc.all().next().is_some()) {
                h2 { "Sign-in identities" }
                table #user-identities {
                    thead { tr { th { "Provider" } th { "Subject" } th { "Email" } th { "Linked" } th { "Last sign-in" } th {} } }
                    tbody {
                        @for i in &identities {
                            tr data-provider=(i.provider) {
                                td { (state.oidc.get(&i.provider).map_or(i.provider.as_str(), |p| p.config.display())) }
                                td { code { (i.subject) } }
                                td { (i.email.as_deref().unwrap_or("")) }
                                td { (when(Some(i.created_at))) }
                                td { (when(i.last_login_at)) }
                                td.actions {
                                    form method="post" action=(format!("/admin/users/{u}/identities/unlink")) {
                                        input type="hidden" name="provider" value=(i.provider);
                                        button { "Unlink" }
                                    }
                                }
                            }
                        }
                    }
                }
                @if own {
                    @for p in state.oidc.all().filter(|p| !identities.iter().any(|i| i.provider == p.config.name)) {
                        form.filters.link method="post" action=(format!("/admin/users/{u}/identities/link")) {
                            input type="hidden" name="provider" value=(p.config.name);
                            button type="submit" { "Link " (p.config.display()) }
                        }
                    }
                }
            }
            h2 { "Recent jobs" }
            table #user-jobs {
                thead { tr { th { "Job" } th { "Kind" } th { "State" } th { "Server" } th { "Created" } th { "Finished" } th { "Error" } } }
                tbody {
                    @for j in &jobs.items {
                        tr {
                            td { a href=(format!("/admin/jobs/{}", j.id)) { code.id { (j.id) } } }
                            td { (j.kind) } td.state { (badge(j.state.as_str())) }
                            td { (j.server_name.as_deref().unwrap_or("")) }
                            td { (when(Some(j.created_at))) } td { (when(j.finished_at)) }
                            td.error { @if let Some(e) = &j.last_error { (super::jobs::folded(e)) } }
                        }
                    }
                }
            }
            p.muted { a href=(format!("/admin/jobs?user={u}")) { "all " (jobs.total) " jobs of " (u) } }
            h2 { "Sessions" }
            table #user-sessions {
                thead { tr { th { "Since" } th { "Until" } th { "Ended" } th { "Address" } } }
                tbody {
                    @for s in &sessions {
                        tr { td { (when(Some(s.issued_at))) } td { (when(Some(s.expires_at))) } td { (when(s.revoked_at)) } td { (s.client_addr.as_deref().unwrap_or("")) } }
                    }
                }
            }
        },
    )
    .into_response()
}

/// A user's name and one of their servers' (the default one when none or empty).
fn user_and_server(
    user: &str,
    server: Option<&str>,
) -> Result<(UserName, ServerName), schema::InvalidName> {
    let server = match server.filter(|s| !s.is_empty()) {
        None => ServerName::default_server(),
        Some(server) => ServerName::parse(server)?,
    };
    Ok((UserName::parse(user)?, server))
}

/// The end of a local-process server's output, as the API gives it to its owner.
async fn server_log(
    State(state): State<AppState>,
    _operator: Operator,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (user, server) = match user_and_server(&name, query.get("server").map(String::as_str)) {
        Ok(n) => n,
        Err(e) => return page_error(StatusCode::BAD_REQUEST, "Bad name", &e.to_string()),
    };
    match crate::servers::log_text(&state, &user, &server, None).await {
        Ok(text) => text,
        Err(e) => failure(e),
    }
}

/// Starts one of a user's servers as a spawn request of theirs would.
async fn start_server(
    State(state): State<AppState>,
    operator: Operator,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let form = match Form::parse(&body) {
        Ok(f) => f,
        Err(bad) => return bad.into_response(),
    };
    let back = format!("/admin/users/{}", super::encode(&name));
    let (user, server) = match user_and_server(&name, form.get("server")) {
        Ok(n) => n,
        Err(e) => return operator.back(&back, Err(e.to_string())),
    };
    let profile = match form.get("profile").filter(|p| !p.is_empty()) {
        Some(named) => crate::profiles::choose(&state, &user, None, Some(named)).await,
        None => crate::profiles::again(&state, &user, &server).await,
    };
    let profile = match profile {
        Ok(profile) => profile,
        Err(e) => return operator.back(&back, Err(e.to_string())),
    };
    match crate::servers::request_spawn(&state, user, server.clone(), None, profile).await {
        Ok(SpawnOutcome::Enqueued(_) | SpawnOutcome::AlreadyPending(_)) => operator.back(
            &back,
            Ok(format!("Starting {name}'s server {:?}", server.as_str())),
        ),
        Ok(SpawnOutcome::AlreadyRunning(_)) => {
            operator.back(&back, Ok("That server is running already".into()))
        }
        Err(e) => operator.back(&back, Err(say(e))),
    }
}

/// Adds an account, with the same checks and audit entry as the API's.
async fn add_user(
    State(state): State<AppState>,
    operator: Operator,
    addr: ClientAddr,
    body: Bytes,
) -> Response {
    let form = match Form::parse(&body) {
        Ok(f) => f,
        Err(bad) => return bad.into_response(),
    };
    let Some(name) = form.get("username") else {
        return operator.back("/admin/users", Err("a user needs a name".into()));
    };
    let role = match Role::parse(form.get("role").unwrap_or("user")) {
        Some(role) => role,
        None => return operator.back("/admin/users", Err("the role is user or admin".into())),
    };
    let account = crate::accounts::new_account(
        name,
        form.get("email").map(str::to_owned),
        form.get("password").map(str::to_owned),
        role,
    )
    .await;
    let created = match account {
        Ok(account) => {
            crate::users::create_account(&state, &operator.principal, &addr, &account).await
        }
        Err(e) => Err(e),
    };
    match created {
        Ok((_, user)) => operator.back(
            &format!("/admin/users?q={}", super::encode(&user.name)),
            Ok(format!("{} was added as {}", user.name, user.role)),
        ),
        Err(e) => operator.back("/admin/users", Err(say(e))),
    }
}

/// Deletes an account as the API does: a cleanup job stops its servers and
/// removes its files, then the account.
async fn delete_user(
    State(state): State<AppState>,
    operator: Operator,
    addr: ClientAddr,
    Path(name): Path<String>,
) -> Response {
    let removed = crate::users::remove_user(
        State(state),
        operator.principal.clone(),
        addr,
        Ok(Path(name.clone())),
    )
    .await;
    match removed {
        Ok((_, body)) => operator.back(
            "/admin/users",
            Ok(format!("{name} is being deleted (job {})", body.job_id)),
        ),
        Err(e) => operator.back("/admin/users", Err(say(e))),
    }
}

/// Links an identity at a provider to the operator's own account: on to the
/// provider, bound to this browser.
async fn link_identity(
    State(state): State<AppState>,
    operator: Operator,
    headers: axum::http::HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let form = match Form::parse(&body) {
        Ok(f) => f,
        Err(bad) => return bad.into_response(),
    };
    let back = format!("/admin/users/{}", super::encode(&name));
    let Principal::User { user, .. } = &operator.principal else {
        return operator.back(&back, Err("only a logged-in user links an identity".into()));
    };
    if user.name != name {
        return operator.back(
            &back,
            Err("only the account's own user links an identity to it".into()),
        );
    }
    let provider = form.get("provider").unwrap_or("");
    match crate::oidc::begin_link(&state, &headers, provider, user).await {
        Ok(response) => response,
        Err(e) => operator.back(&back, Err(say(e))),
    }
}

async fn unlink_identity(
    State(state): State<AppState>,
    operator: Operator,
    addr: ClientAddr,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let form = match Form::parse(&body) {
        Ok(f) => f,
        Err(bad) => return bad.into_response(),
    };
    let back = format!("/admin/users/{}", super::encode(&name));
    let user = match UserName::parse(&name) {
        Ok(u) => u,
        Err(e) => return operator.back("/admin/users", Err(e.to_string())),
    };
    let provider = form.get("provider").unwrap_or("");
    match crate::oidc::unlink_identity(&state, &operator.actor(), &addr, &user, provider).await {
        Ok(()) => operator.back(
            &back,
            Ok(format!("{name}'s {provider} identity is unlinked")),
        ),
        Err(e) => operator.back(&back, Err(say(e))),
    }
}

async fn change_user(
    State(state): State<AppState>,
    operator: Operator,
    addr: ClientAddr,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let form = match Form::parse(&body) {
        Ok(f) => f,
        Err(bad) => return bad.into_response(),
    };
    let user = match UserName::parse(&name) {
        Ok(u) => u,
        Err(e) => return operator.back("/admin/users", Err(e.to_string())),
    };
    let role = match form.get("role") {
        None => None,
        Some(r) => match Role::parse(r) {
            Some(role) => Some(role),
            None => {
                return operator.back(
                    "/admin/users",
                    Err(format!("{r:?} is neither user nor admin")),
                );
            }
        },
    };
    let active = match form.get("active") {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            return operator.back(
                "/admin/users",
                Err(format!("{other:?} is not true or false")),
            );
        }
    };
    if form.get("set_groups").is_some() {
        let groups: Vec<String> = form
            .get("groups")
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_owned)
            .collect();
        let back = format!("/admin/users/{}", super::encode(user.as_str()));
        return match crate::admin::change_groups(&state, &operator.actor(), &addr, &user, &groups)
            .await
        {
            Ok(u) => operator.back(
                &back,
                Ok(format!(
                    "{} is in groups: {}",
                    u.name,
                    u.groups().join(", ")
                )),
            ),
            Err(e) => operator.back(&back, Err(say(e))),
        };
    }
    match crate::admin::change_account(&state, &operator.actor(), &addr, &user, role, active).await
    {
        Ok(u) => operator.back(
            &format!("/admin/users?q={}", super::encode(&u.name)),
            Ok(format!(
                "{} is now {}, {}",
                u.name,
                u.role,
                if u.active { "active" } else { "deactivated" }
            )),
        ),
        Err(e) => operator.back("/admin/users", Err(say(e))),
    }
}

async fn audit(
    State(state): State<AppState>,
    operator: Operator,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let page = match page_of(&query) {
        Ok(p) => p,
        Err(message) => return page_error(StatusCode::BAD_REQUEST, "Bad page", &message),
    };
    let value = |key: &str| query.get(key).cloned().unwrap_or_default();
    let text = |key: &str| query.get(key).filter(|v| !v.is_empty()).cloned();
    let times =
        time_of("since", text("since")).and_then(|s| Ok((s, time_of("until", text("until"))?)));
    let (since, until) = match times {
        Ok(t) => t,
        Err(message) => return page_error(StatusCode::BAD_REQUEST, "Bad filter", &message),
    };
    let filter = AuditFilter {
        actor: text("actor"),
        action: text("action"),
        target: text("target"),
        since,
        until,
    };
    let list = match state
        .db
        .audit_page(&filter, (page - 1) * PER_PAGE, PER_PAGE)
        .await
    {
        Ok(l) => l,
        Err(e) => return failure(e),
    };
    let rows = html! {
        @for a in &list.items {
            tr { td { (when(Some(a.at))) } td { (a.actor.as_deref().unwrap_or("—")) } td { (a.action) } td { (a.target.as_deref().unwrap_or("")) } td { (a.client_addr.as_deref().unwrap_or("")) } td { code { (a.detail.to_string()) } } }
        }
    };
    rows_or_page(&query, rows, |rows| {
        layout(
            "Audit log",
            &operator,
            &query,
            html! {
                form.filters #audit-filter method="get" action="/admin/audit" {
                    label { "Actor" input name="actor" value=(value("actor")) size="14"; }
                    label { "Action" input name="action" value=(value("action")) size="18" placeholder="e.g. login_failed"; }
                    label { "Target" input name="target" value=(value("target")) size="14"; }
                    label { "From (UTC)" input name="since" type="datetime-local" value=(value("since")); }
                    label { "To (UTC)" input name="until" type="datetime-local" value=(value("until")); }
                    button type="submit" { "Filter" }
                    a href="/admin/audit" { "clear" }
                }
                table {
                    thead { tr { th { "When" } th { "Actor" } th { "Action" } th { "Target" } th { "Address" } th { "Detail" } } }
                    tbody data-live { (rows) }
                }
                (pager("/admin/audit", &query, page, PER_PAGE, list.total))
            },
        )
    })
}
