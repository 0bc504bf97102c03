//! The users' way in: `/user/{user}/…` reaches the user's default server and
//! `/user/{user}/{server}/…` a named one, over HTTP and WebSocket, with the path
//! kept as it came (servers are told their prefix). `berth proxy` serves these
//! routes alone, any number of replicas; `berth up` serves them beside the API.
//!
//! A request is let through when it carries the proxy's session cookie (made
//! from an SSO hand-off that lands here) or a bearer token of the owner's, or of
//! a service with `servers:access`; anyone else gets 403, no credential 401 (or
//! the portal's login page). Routes come from the store and are cached for a few
//! seconds, dropped at once when a server changes anywhere. Client traffic is
//! the culler's activity. A server that is not running gets a page saying so.
//!
//! `/user/{user}/_berth/…` is the proxy's own: the progress stream the starting
//! page follows, starting a stopped server, logging out. `_berth` cannot be a
//! server's name.

// A refusal is answered with a response as a success is; boxing it buys nothing.
#![allow(clippy::result_large_err)]

pub(crate) mod access;
mod activity;
pub mod forward;
mod pages;
mod routes;
pub mod websocket;

use std::{net::SocketAddr, time::Duration};

use axum::{
    body::Body,
    extract::ConnectInfo,
    http::{HeaderValue, Method, Request, StatusCode, header},
    response::{IntoResponse, Response},
};
use schema::{Route, RouteChange, ServerName, ServerState, SpawnOutcome, UserName, prelude::*};
use serde_json::json;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub use access::{ACCESS_SCOPE, COOKIE};
use access::{By, Visitor};

use crate::{
    ApiConfig, AppState,
    auth::ClientAddr,
    error::ApiError,
    servers::{SSO_PARAM, request_spawn},
};

/// What every proxied request shares.
pub struct Proxy {
    routes: routes::RouteCache,
    access: access::AccessCache,
    traffic: activity::Traffic,
    ignored: Vec<String>,
    connect_timeout: Duration,
    /// How long a server may take to begin its answer.
    answer_timeout: Duration,
    activity_every: Duration,
    /// How users reach Berth: `http` or `https`.
    scheme: &'static str,
}

impl Proxy {
    pub fn new(config: &ApiConfig, origin: &str) -> Self {
        let connect_timeout = Duration::from_secs(config.proxy.connect_timeout.max(1));
        Self {
            routes: Default::default(),
            access: Default::default(),
            traffic: Default::default(),
            ignored: config
                .proxy
                .ignore_paths
                .iter()
                .map(|p| p.trim().trim_matches('/').to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
            connect_timeout,
            answer_timeout: Duration::from_secs(config.proxy.timeout.max(1)),
            activity_every: Duration::from_secs(config.proxy.activity_interval.max(1)),
            scheme: if origin.starts_with("https://") {
                "https"
            } else {
                "http"
            },
        }
    }
}

/// Whether a request is the proxy's (`api::serve` hands these straight to
/// [`answer`], past the API's router).
pub fn claims(path: &str) -> bool {
    path.starts_with("/user/")
}

/// The proxy's work beside its requests, until `shutdown`: forgetting routes
/// that changed anywhere, and writing the activity seen (once more at the end).
pub async fn background(state: AppState, shutdown: CancellationToken) {
    let (changes, mut heard) = broadcast::channel(1024);
    let relay = {
        let (db, shutdown) = (state.db.clone(), shutdown.clone());
        tokio::spawn(async move { db.relay_route_changes(changes, shutdown).await })
    };
    let forget = {
        let proxy = state.proxy.clone();
        tokio::spawn(async move {
            loop {
                match heard.recv().await {
                    Ok(change) => proxy.routes.forget(change),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        proxy.routes.forget(RouteChange::All)
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    };
    activity::write_loop(
        &state.proxy.traffic,
        &state.db,
        state.proxy.activity_every,
        shutdown,
    )
    .await;
    let _ = relay.await;
    forget.abort();
}

/// Answers a request under `/user/`: the server's answer, or why there is none.
pub async fn answer(state: &AppState, request: Request<Body>) -> Response {
    visit(state, request)
        .await
        .unwrap_or_else(|answered| answered)
}

/// What a request gets when it does not reach a server: a page for a browser,
/// `{error, message}` for anything else.
fn refuse(error: ApiError, html: bool) -> Response {
    if !html {
        return error.into_response();
    }
    let status = error.status();
    let title = match status {
        StatusCode::UNAUTHORIZED => "Not logged in",
        StatusCode::FORBIDDEN => "Not yours",
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::TOO_MANY_REQUESTS => "Full",
        StatusCode::CONFLICT => "Not now",
        s if s.is_client_error() => "Refused",
        _ => "Something went wrong",
    };
    pages::notice(status, title, &error.public_message())
}

/// Whether a browser asked for a page (rather than an API client for data).
fn wants_html(request: &Parts) -> bool {
    request.method == Method::GET
        && request
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/html"))
}

fn redirect(status: StatusCode, to: &str) -> Response {
    let mut response = status.into_response();
    if let Ok(location) = HeaderValue::try_from(to) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

fn with_query(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.to_owned(),
    }
}

/// The SSO hand-off token a query carries.
fn sso_token(query: &str) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == SSO_PARAM)
        .map(|(_, v)| v)
}

/// The query without the SSO token.
fn without_sso(query: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split('=').next() != Some(SSO_PARAM) && !pair.is_empty())
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

type Answer = Result<Response, Response>;
type Parts = axum::http::request::Parts;

async fn visit(state: &AppState, request: Request<Body>) -> Answer {
    // The parts are shared across awaits; the body (not `Sync`) goes along whole.
    let (request, body) = request.into_parts();
    let html = wants_html(&request);
    let path = request.uri.path().to_owned();
    let query = request.uri.query().map(str::to_owned);
    let rest = path.strip_prefix("/user/").unwrap_or_default();
    let (user_part, under) = match rest.split_once('/') {
        Some((user, under)) => (user, Some(under)),
        None => (rest, None),
    };
    let user = UserName::parse(user_part).map_err(|_| {
        refuse(
            ApiError::NotFound(format!("no user named {user_part:?}")),
            html,
        )
    })?;
    let Some(under) = under else {
        let to = with_query(&format!("/user/{user}/"), query.as_deref());
        return Ok(redirect(StatusCode::TEMPORARY_REDIRECT, &to));
    };
    if let Some(own) = under.strip_prefix("_berth/") {
        let own = own.to_owned();
        return own_path(state, request, body, &user, &own, html).await;
    }
    if let Some(token) = query.as_deref().and_then(sso_token) {
        let under = under.to_owned();
        return land(state, &request, &user, &under, &token, html).await;
    }
    let by = admit(state, &request, &user, html).await?;
    let routes = state
        .proxy
        .routes
        .of(&state.db, &user)
        .await
        .map_err(|e| refuse(e.into(), html))?;
    let (route, rest) = match pick(&routes, under) {
        Picked::Server(route, rest) => (route.clone(), rest.to_owned()),
        Picked::AddSlash(name) => {
            let to = with_query(&format!("/user/{user}/{name}/"), query.as_deref());
            return Ok(redirect(StatusCode::TEMPORARY_REDIRECT, &to));
        }
        Picked::None if html => {
            return Ok(pages::not_running(
                StatusCode::NOT_FOUND,
                "",
                "not created yet",
                None,
                Some(&format!("/user/{user}/_berth/start")),
            ));
        }
        Picked::None => {
            return Err(refuse(
                ApiError::NotFound(format!("{user} has no server here")),
                false,
            ));
        }
    };
    running(&user, &route, html)?;
    if by == By::Cookie && !same_origin(state, &request) {
        return Err(refuse(
            ApiError::Forbidden("a request from another site was refused".into()),
            html,
        ));
    }
    if activity::counts(&request.method, &rest, &state.proxy.ignored) {
        state.proxy.traffic.touch(route.server_id);
    }
    forward(
        state,
        Request::from_parts(request, body),
        &user,
        &route,
        html,
    )
    .await
}

enum Picked<'a> {
    /// The server and the path under its prefix.
    Server(&'a Route, &'a str),
    /// A named server's prefix without its slash.
    AddSlash(&'a str),
    /// The user has no server at that path.
    None,
}

/// A named server owns `/user/{user}/{name}/` once it exists; any other path is
/// the default server's.
fn pick<'a>(routes: &'a [Route], under: &'a str) -> Picked<'a> {
    let (first, after) = match under.split_once('/') {
        Some((first, after)) => (first, Some(after)),
        None => (under, None),
    };
    if !first.is_empty()
        && let Some(named) = routes.iter().find(|r| r.server_name == first)
    {
        return match after {
            Some(after) => Picked::Server(named, after),
            None => Picked::AddSlash(&named.server_name),
        };
    }
    match routes.iter().find(|r| r.server_name.is_empty()) {
        Some(default) => Picked::Server(default, under),
        None => Picked::None,
    }
}

/// Lets the owner through (or a service with `servers:access`); says how they
/// proved it.
async fn admit(
    state: &AppState,
    request: &Parts,
    user: &UserName,
    html: bool,
) -> Result<By, Response> {
    Ok(admit_visitor(state, request, user, html).await?.1)
}

/// `admit`, and who was let through.
async fn admit_visitor(
    state: &AppState,
    request: &Parts,
    user: &UserName,
    html: bool,
) -> Result<(Visitor, By), Response> {
    let found = access::visitor(state, &request.headers)
        .await
        .map_err(|e| refuse(e, html))?;
    let Some((visitor, by)) = found else {
        return Err(unauthenticated(state, request, html));
    };
    match may_enter(&visitor, user) {
        Ok(()) => Ok((visitor, by)),
        Err(e) => Err(refuse(e, html)),
    }
}

/// Whether `visitor` may reach `user`'s servers: the owner, or a service with
/// `servers:access`.
fn may_enter(visitor: &Visitor, user: &UserName) -> Result<(), ApiError> {
    match visitor {
        Visitor::User { name, .. } if name == user.as_str() => Ok(()),
        Visitor::Service { access: true, .. } => Ok(()),
        Visitor::Service { .. } => Err(ApiError::Forbidden(format!(
            "this token lacks the {ACCESS_SCOPE} scope that reaches users' servers"
        ))),
        Visitor::User { .. } | Visitor::Nobody => Err(ApiError::Forbidden(format!(
            "this server belongs to {user}, not to you"
        ))),
    }
}

/// No credential: the portal's login page for a browser when one is configured,
/// else 401.
fn unauthenticated(state: &AppState, request: &Parts, html: bool) -> Response {
    let login = state
        .config
        .proxy
        .login_url
        .as_deref()
        .filter(|u| !u.is_empty());
    if let (true, Some(login)) = (html, login) {
        let wanted = format!(
            "{}{}",
            state.origin,
            request.uri.path_and_query().map_or("/", |p| p.as_str())
        );
        let separator = if login.contains('?') { '&' } else { '?' };
        let next = serde_urlencoded::to_string([("next", wanted)]).unwrap_or_default();
        return redirect(StatusCode::FOUND, &format!("{login}{separator}{next}"));
    }
    refuse(
        ApiError::Unauthorized(
            "you are not logged in to this server: open it from your portal (a single-use \
             link), or send Authorization: Bearer <token>"
                .into(),
        ),
        html,
    )
}

/// Ok when the server runs; otherwise the starting page, or why it does not run.
fn running(user: &UserName, route: &Route, html: bool) -> Result<(), Response> {
    let name = route.server_name.as_str();
    let start = format!("/user/{user}/_berth/start");
    match route.state {
        ServerState::Running if route.url.is_some() && route.proxy_token.is_some() => Ok(()),
        ServerState::Running | ServerState::PendingSpawn if html => Err(pages::starting(
            name,
            &format!("/user/{user}/_berth/progress?server={name}"),
        )),
        ServerState::Running | ServerState::PendingSpawn => Err(ApiError::Overloaded {
            message: "the server is starting; try again shortly".into(),
            retry_after: 2,
        }
        .into_response()),
        ServerState::PendingStop if html => Err(pages::not_running(
            StatusCode::CONFLICT,
            name,
            "stopping",
            None,
            None,
        )),
        ServerState::PendingStop => Err(refuse(
            ApiError::Conflict("the server is stopping".into()),
            false,
        )),
        ServerState::Stopped | ServerState::Failed if html => Err(pages::not_running(
            StatusCode::CONFLICT,
            name,
            route.state.as_str(),
            route.error.as_deref(),
            Some(&start),
        )),
        ServerState::Stopped | ServerState::Failed => Err(refuse(
            ApiError::Conflict(match route.error.as_deref() {
                Some(reason) => format!("the server is {}: {reason}", route.state),
                None => format!("the server is {}; start it again", route.state),
            }),
            false,
        )),
    }
}

/// A request that changes something (or opens a WebSocket), authenticated by a
/// cookie, must come from this origin: `SameSite=Lax` keeps other sites' posts
/// cookie-less, and this also refuses sibling hosts of the same site.
fn same_origin(state: &AppState, request: &Parts) -> bool {
    // A WebSocket handshake is a GET, but opens a channel that acts: checked too.
    let upgrade = request.headers.contains_key(header::UPGRADE);
    if !upgrade && matches!(request.method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return true;
    }
    crate::auth::from_own_pages(state, &request.headers)
}

/// The client's address as the proxy tells servers.
fn caller<'a>(state: &'a AppState, request: &Parts) -> forward::Caller<'a> {
    let peer = request
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    forward::Caller {
        peer,
        trust_forwarded: peer.is_some_and(|peer| state.trusted.contains(peer)),
        scheme: state.proxy.scheme,
    }
}

async fn forward(
    state: &AppState,
    request: Request<Body>,
    user: &UserName,
    route: &Route,
    html: bool,
) -> Answer {
    let (Some(url), Some(token)) = (route.url.as_deref(), route.proxy_token.as_deref()) else {
        return Err(refuse(
            ApiError::Unavailable("the server has no address".into()),
            html,
        ));
    };
    let upstream = forward::Upstream { url, token };
    let (parts, body) = request.into_parts();
    let caller = caller(state, &parts);
    let request = Request::from_parts(parts, body);
    let result = match forward::upgrade_of(&request) {
        Some(protocol) => {
            let proxy = state.proxy.clone();
            let server = route.server_id;
            forward::websocket(
                request,
                &upstream,
                &caller,
                protocol,
                state.proxy.connect_timeout,
                move || proxy.traffic.touch(server),
            )
            .await
        }
        None => {
            // The client connection's own connections to servers (`api::serve`
            // gives each connection its set); a request from elsewhere gets one.
            let upstreams = request
                .extensions()
                .get::<std::sync::Arc<forward::Upstreams>>()
                .cloned()
                .unwrap_or_default();
            let timeouts = (state.proxy.connect_timeout, state.proxy.answer_timeout);
            forward::http(&upstreams, request, &upstream, &caller, timeouts).await
        }
    };
    result.map_err(|e| {
        tracing::warn!(user = %user, server = %route.server_name, address = url, error = %e, "the server did not answer the proxy");
        match (html, e) {
            (true, _) => pages::unreachable(&route.server_name),
            (false, e @ forward::ForwardError::Timeout(_)) => {
                ApiError::GatewayTimeout(e.to_string()).into_response()
            }
            (false, e) => ApiError::BadGateway(e.to_string()).into_response(),
        }
    })
}

/// An SSO hand-off landing: spends the token, opens the session and sends the
/// browser on to the same URL without the token.
async fn land(
    state: &AppState,
    request: &Parts,
    user: &UserName,
    under: &str,
    token: &str,
    html: bool,
) -> Answer {
    let routes = state
        .proxy
        .routes
        .of(&state.db, user)
        .await
        .map_err(|e| refuse(e.into(), html))?;
    let route = match pick(&routes, under) {
        Picked::Server(route, _) => route,
        Picked::AddSlash(name) => routes
            .iter()
            .find(|r| r.server_name == name)
            .expect("picked from these routes"),
        Picked::None => {
            return Err(refuse(
                ApiError::NotFound(format!("{user} has no server here")),
                html,
            ));
        }
    };
    let addr = request
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| {
            state
                .trusted
                .client(peer.ip(), &request.headers)
                .to_string()
        });
    let cookie = access::land(state, route, token, addr.as_deref())
        .await
        .map_err(|e| refuse(e, html))?
        .ok_or_else(|| {
            refuse(
                ApiError::Unauthorized(
                    "this link has expired or was used already: open the server from your \
                     portal again"
                        .into(),
                ),
                html,
            )
        })?;
    state
        .audit(
            Some(&format!("user:{user}")),
            "proxy_login",
            Some(&format!("{user}/{}", route.server_name)),
            &ClientAddr(addr),
            json!({}),
        )
        .await;
    let path = request.uri.path();
    let to = with_query(path, request.uri.query().and_then(without_sso).as_deref());
    let mut response = redirect(StatusCode::FOUND, &to);
    if let Ok(value) = HeaderValue::try_from(access::set_cookie(state, user.as_str(), &cookie)) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

/// `/user/{user}/_berth/…`: the proxy's own paths, for the owner.
async fn own_path(
    state: &AppState,
    request: Parts,
    body: Body,
    user: &UserName,
    own: &str,
    html: bool,
) -> Answer {
    let method = request.method.clone();
    match (own, method) {
        ("logout", Method::GET | Method::POST) => Ok(logout(state, &request, user).await),
        ("progress", Method::GET) => {
            let (visitor, _) = admit_visitor(state, &request, user, false).await?;
            let slot = state
                .open_stream(visitor.caller())
                .map_err(|e| refuse(e, false))?;
            let server = server_in_query(request.uri.query()).map_err(|e| refuse(e, false))?;
            let row = state
                .db
                .get_server(user, &server)
                .await
                .map_err(|e| refuse(e.into(), false))?
                .ok_or_else(|| {
                    refuse(
                        ApiError::NotFound(format!("{user} has no server {server:?}")),
                        false,
                    )
                })?;
            let still = {
                let (state, headers, user) = (state.clone(), request.headers.clone(), user.clone());
                Box::new(move || -> futures::future::BoxFuture<'static, bool> {
                    let (state, headers, user) = (state.clone(), headers.clone(), user.clone());
                    Box::pin(async move {
                        match access::visitor(&state, &headers).await {
                            Ok(Some((visitor, _))) => may_enter(&visitor, &user).is_ok(),
                            Ok(None) => false,
                            // A database that does not answer ends nothing.
                            Err(_) => true,
                        }
                    })
                })
            };
            Ok(crate::progress::follow(state.clone(), row, slot, still).into_response())
        }
        ("start", Method::POST) => {
            let by = admit(state, &request, user, true).await?;
            if by == By::Cookie && !same_origin(state, &request) {
                return Err(refuse(
                    ApiError::Forbidden("a request from another site was refused".into()),
                    true,
                ));
            }
            let body = axum::body::to_bytes(body, 4096)
                .await
                .map_err(|_| refuse(ApiError::BadRequest("the form is too large".into()), true))?;
            let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body)
                .map_err(|e| refuse(ApiError::BadRequest(format!("the form: {e}")), true))?;
            let name = form
                .iter()
                .find(|(k, _)| k == "server")
                .map_or("", |(_, v)| v.as_str());
            let server = ServerName::parse_or_default(name).map_err(|e| refuse(e.into(), true))?;
            start(state, user, server).await
        }
        _ => Err(refuse(
            ApiError::NotFound(format!("no such path under /user/{user}/_berth/")),
            html,
        )),
    }
}

fn server_in_query(query: Option<&str>) -> Result<ServerName, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("the query: {e}")))?;
    let name = pairs
        .iter()
        .find(|(k, _)| k == "server")
        .map_or("", |(_, v)| v.as_str());
    Ok(ServerName::parse_or_default(name)?)
}

/// Starts the owner's server from the stopped page, then on to it (the starting page).
async fn start(state: &AppState, user: &UserName, server: ServerName) -> Answer {
    let to = schema::server_path(user, &server);
    let profile = match crate::profiles::again(state, user, &server).await {
        Ok(profile) => profile,
        Err(e) => return Err(refuse(e, true)),
    };
    match request_spawn(state, user.clone(), server, None, profile).await {
        Ok(
            SpawnOutcome::Enqueued(_)
            | SpawnOutcome::AlreadyPending(_)
            | SpawnOutcome::AlreadyRunning(_),
        ) => {
            state.proxy.routes.forget_user(user);
            Ok(redirect(StatusCode::SEE_OTHER, &to))
        }
        Err(e) => Err(refuse(e, true)),
    }
}

/// Ends the proxy's session in this browser.
async fn logout(state: &AppState, request: &Parts, user: &UserName) -> Response {
    if let Some(value) = crate::auth::cookie(&request.headers, COOKIE) {
        if let Err(e) = state
            .db
            .revoke_proxy_session(&crate::tokens::hash_opaque(value))
            .await
        {
            return refuse(e.into(), true);
        }
        state.proxy.access.forget_cookie(value);
    }
    let mut response = match state
        .config
        .proxy
        .login_url
        .as_deref()
        .filter(|u| !u.is_empty())
    {
        Some(login) => redirect(StatusCode::FOUND, login),
        None => pages::notice(
            StatusCode::OK,
            "Logged out",
            "You are logged out of your server.",
        ),
    };
    if let Ok(value) = HeaderValue::try_from(access::set_cookie(state, user.as_str(), "")) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}
