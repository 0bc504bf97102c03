//! The operator dashboard at `/admin`: server-rendered HTML (maud) with a little
//! hand-written JavaScript for live updates. Admins log in with the same accounts
//! as the API; the session is the same revocable JWT, kept in an HttpOnly,
//! SameSite=Strict cookie scoped to `/admin`. Every action is a POST whose Origin,
//! when the browser sends one, must be this host.

mod charts;
mod jobs;
mod pages;
mod profiles;

use std::{collections::HashMap, convert::Infallible, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{FromRequestParts, Query, State},
    http::{HeaderValue, StatusCode, header, request::Parts},
    response::{
        IntoResponse, Redirect, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde_json::{Value, json};

use schema::prelude::*;

use crate::{
    AppState,
    accounts::{Login, log_in},
    auth::{ClientAddr, Principal},
    error::ApiError,
};

const COOKIE: &str = "berth_session";
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(pages::overview))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/events", get(events))
        .route("/static/app.js", get(script))
        .route("/static/app.css", get(style))
        .merge(jobs::router())
        .merge(pages::router())
        .merge(profiles::router())
        .layer(axum::middleware::map_response(with_csp))
}

async fn with_csp(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    // With `no-referrer` (the API's) browsers send `Origin: null` on form posts,
    // which the same-origin check refuses; same-origin keeps the real origin.
    response.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// A logged-in admin. Anyone else is sent to the login page (no session) or told
/// 403 (a session without the admin role).
pub struct Operator {
    pub principal: Principal,
    pub name: String,
    /// Seals what the pages say after an action, so that a link cannot make the
    /// dashboard say something of its own.
    keys: std::sync::Arc<crate::tokens::JwtKeys>,
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let to_login = || {
            // Nested under /admin, the router sees the path without it: the page
            // wanted is /admin + that (it was the path alone, so a login landed
            // on the overview instead).
            let next = match parts.uri.path_and_query().map_or("/", |p| p.as_str()) {
                "/" => "/admin".to_owned(),
                inner => format!("/admin{inner}"),
            };
            let target = format!("/admin/login?next={}", encode(&next));
            Redirect::to(&target).into_response()
        };
        let Some(token) = crate::auth::cookie(&parts.headers, COOKIE).map(str::to_owned) else {
            return Err(to_login());
        };
        let principal = match Principal::from_token(state, &token).await {
            Ok(p) => p,
            Err(ApiError::Unauthorized(_)) => return Err(to_login()),
            Err(e) => return Err(e.into_response()),
        };
        if !principal.is_admin() {
            return Err(page_error(
                StatusCode::FORBIDDEN,
                "Admins only",
                "This dashboard is for administrators. Your account is not one.",
            ));
        }
        if parts.method == axum::http::Method::POST
            && !crate::auth::from_own_pages(state, &parts.headers)
        {
            return Err(page_error(
                StatusCode::FORBIDDEN,
                "Refused",
                "This action came from another site.",
            ));
        }
        let name = match &principal {
            Principal::User { user, .. } => user.name.clone(),
            other => other.actor(),
        };
        Ok(Operator {
            principal,
            name,
            keys: state.keys.clone(),
        })
    }
}

impl Operator {
    pub fn actor(&self) -> String {
        self.principal.actor()
    }

    /// Where to go after an action, with what to say there (sealed).
    pub fn back(&self, to: &str, notice: Result<String, String>) -> Response {
        let (key, text) = match notice {
            Ok(text) => ("notice", text),
            Err(text) => ("error", text),
        };
        let seal = self.keys.seal(&format!("{key}:{text}"));
        let sep = if to.contains('?') { '&' } else { '?' };
        Redirect::to(&format!("{to}{sep}{key}={}&seal={seal}", encode(&text))).into_response()
    }

    /// The notice or error a page was sent with, if this server sealed it.
    fn said<'a>(&self, query: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
        let text = query.get(key)?;
        let seal = query.get("seal")?;
        self.keys
            .sealed(&format!("{key}:{text}"), seal)
            .then_some(text.as_str())
    }
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    serde_urlencoded::to_string([("v", value)])
        .map(|s| s.trim_start_matches("v=").to_owned())
        .unwrap_or_default()
}

/// A urlencoded form body, repeated keys kept (bulk actions send many ids).
pub struct Form(Vec<(String, String)>);

impl Form {
    pub fn parse(body: &Bytes) -> Result<Self, BadForm> {
        serde_urlencoded::from_bytes(body)
            .map(Form)
            .map_err(|_| BadForm)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A body that is not a urlencoded form.
pub struct BadForm;

impl IntoResponse for BadForm {
    fn into_response(self) -> Response {
        page_error(
            StatusCode::BAD_REQUEST,
            "Bad form",
            "The form could not be read.",
        )
    }
}

/// What an action's error tells the operator: the API's message for a 4xx, a
/// generic line for anything else (logged by `ApiError`).
pub fn say(e: ApiError) -> String {
    e.public_message()
}

pub fn page_error(status: StatusCode, title: &str, message: &str) -> Response {
    let body = html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { (title) " · Berth" } link rel="stylesheet" href="/admin/static/app.css"; }
            body { main.narrow { h1 { (title) } p { (message) } p { a href="/admin/login" { "Log in as someone else" } } } }
        }
    };
    (status, body).into_response()
}

/// The frame of every page: navigation, the notice of the last action, the content.
pub fn layout(
    title: &str,
    operator: &Operator,
    query: &HashMap<String, String>,
    content: Markup,
) -> Markup {
    let nav = [
        ("/admin", "Overview"),
        ("/admin/jobs", "Jobs"),
        ("/admin/servers", "Servers"),
        ("/admin/workers", "Workers"),
        ("/admin/schedules", "Schedules"),
        ("/admin/users", "Users"),
        ("/admin/profiles", "Profiles"),
        ("/admin/audit", "Audit log"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Berth" }
                link rel="stylesheet" href="/admin/static/app.css";
                script src="/admin/static/app.js" defer {}
            }
            body {
                header {
                    span.brand { "Berth" }
                    nav { @for (href, label) in nav { a href=(href) class=[(label == title).then_some("here")] { (label) } } }
                    form.logout method="post" action="/admin/logout" {
                        span { (operator.name) }
                        button type="submit" { "Log out" }
                    }
                }
                main {
                    h1 { (title) span #live.live title="live updates" {} }
                    @if let Some(text) = operator.said(query, "notice") { p.notice role="status" { (text) } }
                    @if let Some(text) = operator.said(query, "error") { p.error role="alert" { (text) } }
                    (content)
                }
            }
        }
    }
}

pub fn when(at: Option<DateTime<Utc>>) -> Markup {
    match at {
        Some(at) => html! { time datetime=(at.to_rfc3339()) title=(at.to_rfc3339()) { (ago(at)) } },
        None => html! { span.muted { "—" } },
    }
}

pub fn ago(at: DateTime<Utc>) -> String {
    let secs = (Utc::now() - at).num_seconds();
    let (n, unit) = match secs.abs() {
        s if s < 60 => (s, "s"),
        s if s < 3600 => (s / 60, "min"),
        s if s < 86_400 => (s / 3600, "h"),
        s => (s / 86_400, "d"),
    };
    if secs >= 0 {
        format!("{n} {unit} ago")
    } else {
        format!("in {n} {unit}")
    }
}

pub fn badge(state: &str) -> Markup {
    html! { span class=(format!("badge {state}")) { (state) } }
}

/// Page links that keep the query's filters.
pub fn pager(
    path: &str,
    query: &HashMap<String, String>,
    page: i64,
    per_page: i64,
    total: i64,
) -> Markup {
    let pages = ((total + per_page - 1) / per_page).max(1);
    let link = |p: i64| {
        let mut q: Vec<(&str, String)> = query
            .iter()
            .filter(|(k, _)| {
                !matches!(k.as_str(), "page" | "notice" | "error" | "seal" | "partial")
            })
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        q.push(("page", p.to_string()));
        format!(
            "{path}?{}",
            serde_urlencoded::to_string(&q).unwrap_or_default()
        )
    };
    html! {
        nav.pager {
            @if page > 1 { a href=(link(page - 1)) rel="prev" { "← newer" } }
            span { "page " (page) " of " (pages) " · " (total) " in all" }
            @if page < pages { a href=(link(page + 1)) rel="next" { "older →" } }
        }
    }
}

/// A time a filter form sent (`datetime-local`, read as UTC, or RFC 3339), if any.
pub fn time_of(key: &str, value: Option<String>) -> Result<Option<DateTime<Utc>>, String> {
    match value.filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => DateTime::parse_from_rfc3339(&v)
            .map(|t| t.with_timezone(&Utc))
            .or_else(|_| {
                chrono::NaiveDateTime::parse_from_str(&v, "%Y-%m-%dT%H:%M").map(|t| t.and_utc())
            })
            .map(Some)
            .map_err(|_| format!("{key} {v:?} is not a time (YYYY-MM-DDTHH:MM, UTC)")),
    }
}

/// `page` from the query, from 1.
pub fn page_of(query: &HashMap<String, String>) -> Result<i64, String> {
    match query.get("page").filter(|p| !p.is_empty()) {
        None => Ok(1),
        Some(p) => p
            .parse::<i64>()
            .ok()
            .filter(|p| (1..=1_000_000).contains(p))
            .ok_or_else(|| format!("page {p:?} is not a page number")),
    }
}

/// A list page answers `?partial=rows` with its table body only: the script swaps
/// it in when the platform changes.
pub fn rows_or_page(
    query: &HashMap<String, String>,
    rows: Markup,
    page: impl FnOnce(Markup) -> Markup,
) -> Response {
    if query.get("partial").map(String::as_str) == Some("rows") {
        rows.into_response()
    } else {
        page(rows).into_response()
    }
}

async fn login_page(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Markup {
    // A failed login is answered with the form and its error; a link's `error`
    // is not shown.
    login_form(&state, query.get("next").map(String::as_str), None)
}

fn login_form(state: &AppState, next: Option<&str>, error: Option<&str>) -> Markup {
    let next = next.filter(|n| dashboard_path(n)).unwrap_or("/admin");
    html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "Log in · Berth" } link rel="stylesheet" href="/admin/static/app.css"; }
            body {
                main.narrow {
                    h1 { "Berth operator dashboard" }
                    @if let Some(e) = error { p.error role="alert" { (e) } }
                    form.login method="post" action="/admin/login" {
                        input type="hidden" name="next" value=(next);
                        label { "User name or email" input #username name="username" autocomplete="username" required autofocus; }
                        label { "Password" input #password name="password" type="password" autocomplete="current-password" required; }
                        button #login type="submit" { "Log in" }
                    }
                    @for p in state.oidc.all() {
                        p.sso {
                            a.button data-provider=(p.config.name)
                                href=(format!("/api/v1/auth/oidc/{}/start?next={}", p.config.name, encode(next))) {
                                "Sign in with " (p.config.display())
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn login(State(state): State<AppState>, addr: ClientAddr, body: Bytes) -> Response {
    let form = match Form::parse(&body) {
        Ok(form) => form,
        Err(bad) => return bad.into_response(),
    };
    let next = form
        .get("next")
        .filter(|n| dashboard_path(n))
        .unwrap_or("/admin")
        .to_owned();
    let credentials = Login {
        username: form.get("username").unwrap_or_default().to_owned(),
        password: form.get("password").unwrap_or_default().to_owned(),
    };
    match log_in(&state, &addr, credentials).await {
        Ok((token, _)) => {
            let mut response = Redirect::to(&next).into_response();
            response
                .headers_mut()
                .insert(header::SET_COOKIE, session_cookie(&state, &token));
            response
        }
        Err(e) => {
            let status = e.status();
            let message = say(e);
            (status, login_form(&state, Some(&next), Some(&message))).into_response()
        }
    }
}

/// The dashboard's session cookie holding `token`.
pub fn session_cookie(state: &AppState, token: &str) -> HeaderValue {
    let secure = if state.config.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={token}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        state.config.token_ttl
    );
    HeaderValue::from_str(&cookie).expect("cookie is text")
}

/// Whether `next` may be where a login sends the browser: a dashboard page
/// (not the login page) of visible ASCII (a control character made the
/// redirect's header invalid, a 500): never an open redirect.
pub fn dashboard_path(next: &str) -> bool {
    next.starts_with("/admin")
        && !next.starts_with("/admin/login")
        && next.chars().all(|c| c.is_ascii_graphic())
}

async fn logout(State(state): State<AppState>, operator: Operator, addr: ClientAddr) -> Response {
    if let Principal::User { jti, user } = &operator.principal {
        if let Err(e) = state.db.revoke_session(*jti).await {
            tracing::error!(error = %e, "could not revoke a dashboard session");
        }
        state
            .audit(
                Some(&operator.actor()),
                "logout",
                Some(&user.name),
                &addr,
                json!({ "via": "dashboard" }),
            )
            .await;
    }
    let mut response = Redirect::to("/admin/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "berth_session=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    response
}

/// The platform at a glance, as the overview and the live updates show it.
pub async fn snapshot(state: &AppState) -> Result<Value, ApiError> {
    let limits = state.limits().await?;
    let usage = state.db.usage().await?;
    let counts = state.db.job_counts().await?;
    let mut queues = serde_json::Map::new();
    for c in &counts {
        let entry = queues
            .entry(c.kind.queue().to_owned())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("an object");
        let state = c.state.as_str();
        let n = entry.get(state).and_then(Value::as_i64).unwrap_or(0) + c.count;
        entry.insert(state.to_owned(), json!(n));
    }
    let now = Utc::now();
    let workers = state.db.list_workers().await?;
    let alive = workers
        .iter()
        .filter(|w| crate::metrics::worker_alive(w, now))
        .count();
    let failures = state
        .db
        .failures_since(now - chrono::Duration::hours(1))
        .await?;
    let servers = state.db.server_counts().await?;
    Ok(json!({
        "queues": queues,
        "spawn_slots": { "in_use": usage.spawns_in_flight, "limit": limits.concurrent_spawn_limit },
        "active_servers": { "count": usage.active_servers, "limit": limits.active_server_limit },
        "waiting_spawns": usage.waiting_spawns,
        "workers_alive": alive,
        "failures_last_hour": failures,
        "servers": servers.into_iter().map(|c| (c.state.as_str().to_owned(), json!(c.count))).collect::<serde_json::Map<_, _>>(),
    }))
}

/// Live updates: the snapshot whenever it changes (looked at every second).
async fn events(
    State(state): State<AppState>,
    _operator: Operator,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let stream = futures::stream::unfold((state, String::new()), |(state, last)| async move {
        loop {
            if let Ok(now) = snapshot(&state).await {
                let text = now.to_string();
                if text != last {
                    return Some((
                        Ok(Event::default().event("snapshot").data(text.clone())),
                        (state, text),
                    ));
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("app.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("app.css"),
    )
        .into_response()
}

/// Markup that is already safe (the numbers and fixed strings of a snapshot).
pub fn raw(text: String) -> PreEscaped<String> {
    PreEscaped(text)
}
