//! `/api/v1/auth/oidc`: begin a sign-in at a provider, come back from it, hand
//! a portal its session; and an account's linked identities.
//!
//! A sign-in is an authorization-code flow with PKCE (S256) and a nonce. What the
//! callback must match is stored by the hash of its `state` and spent once; it is
//! bound to the browser that began it by a cookie (`berth_oidc`), so that a
//! callback URL sent to someone else, or a sign-in begun by an attacker and
//! finished by a victim, is refused.

use axum::{
    Json,
    extract::{Path, Query, State, rejection::PathRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, html};
use schema::{
    NewAccount, Role, StoreError, UserName, UserRow,
    identities::{FlowKind, OidcFlow},
    prelude::*,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{IdClaims, IdTokenError, Provider, ProviderError};
use crate::{
    AppState,
    accounts::{Session, open_session},
    auth::{ClientAddr, Principal},
    body::{JsonBody, OptionalJson},
    error::{ApiError, ApiResult},
    openapi::{Errors, UserParam},
    tokens::{hash_opaque, new_opaque},
    users::user_name,
};

/// The cookie that binds a sign-in to the browser that began it.
const BROWSER_COOKIE: &str = "berth_oidc";
/// How long a sign-in may take at the provider.
const FLOW_SECS: i64 = 600;
/// How long a portal has to exchange its hand-off code.
const HANDOFF_SECS: i64 = 60;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(start))
        .routes(routes!(callback))
        .routes(routes!(exchange))
        .routes(routes!(link))
        .routes(routes!(identities))
        .routes(routes!(unlink))
}

/// A provider users may sign in with.
#[derive(Debug, Serialize, ToSchema)]
struct ProviderView {
    name: String,
    display_name: String,
    /// Where a browser begins a sign-in (add `?next=` or `?return_to=`).
    start_url: String,
}

/// The OpenID Connect providers users may sign in with.
#[utoipa::path(get, path = "/auth/oidc", tag = "auth", security(()),
    responses((status = 200, description = "The providers", body = Vec<ProviderView>), Errors))]
async fn list(State(state): State<AppState>) -> Json<Vec<ProviderView>> {
    Json(
        state
            .oidc
            .all()
            .map(|p| ProviderView {
                name: p.config.name.clone(),
                display_name: p.config.display().to_owned(),
                start_url: format!("{}/api/v1/auth/oidc/{}/start", state.origin, p.config.name),
            })
            .collect(),
    )
}

/// A provider in a path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct ProviderParam {
    /// The provider's name, as `GET /api/v1/auth/oidc` lists it.
    #[param(pattern = "^[a-z0-9-]{1,32}$")]
    provider: String,
}

fn provider_of(
    state: &AppState,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<&Provider> {
    let Path(name) = path?;
    state
        .oidc
        .get(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no sign-in provider is named {name:?}")))
}

/// Where the browser goes once signed in.
#[derive(Debug, Clone, PartialEq)]
enum Destination {
    /// A dashboard path: a session cookie for `/admin`.
    Dashboard(String),
    /// A path under `/user/`: a proxy session for the user's servers.
    Proxy(String),
    /// A portal's page: a hand-off code it exchanges for a session.
    Portal(String),
}

impl Destination {
    fn stored(&self) -> String {
        match self {
            Destination::Dashboard(p) => format!("dashboard:{p}"),
            Destination::Proxy(p) => format!("proxy:{p}"),
            Destination::Portal(u) => format!("portal:{u}"),
        }
    }

    fn from_stored(text: Option<&str>) -> Self {
        match text.and_then(|t| t.split_once(':')) {
            Some(("proxy", p)) => Destination::Proxy(p.to_owned()),
            Some(("portal", u)) => Destination::Portal(u.to_owned()),
            Some(("dashboard", p)) => Destination::Dashboard(p.to_owned()),
            _ => Destination::Dashboard("/admin".into()),
        }
    }

    /// Where a sign-in may end: never anywhere the operator did not name.
    fn parse(
        state: &AppState,
        next: Option<&str>,
        return_to: Option<&str>,
    ) -> ApiResult<Destination> {
        let visible = |s: &str| s.chars().all(|c| c.is_ascii_graphic());
        match (
            next.filter(|n| !n.is_empty()),
            return_to.filter(|r| !r.is_empty()),
        ) {
            (Some(_), Some(_)) => Err(ApiError::BadRequest(
                "give next (a page of Berth's) or return_to (a portal's page), not both".into(),
            )),
            (None, None) => Ok(Destination::Dashboard("/admin".into())),
            (None, Some(url)) => {
                let allowed = reqwest::Url::parse(url).ok().is_some_and(|u| {
                    let origin = u.origin().ascii_serialization();
                    u.fragment().is_none()
                        && visible(url)
                        && state
                            .config
                            .cors_origins
                            .iter()
                            .any(|o| o.trim_end_matches('/') == origin)
                });
                if allowed {
                    Ok(Destination::Portal(url.to_owned()))
                } else {
                    Err(ApiError::BadRequest(
                        "return_to must be a page of a portal whose origin is in \
                         BERTH_CORS_ORIGINS, without a fragment"
                            .into(),
                    ))
                }
            }
            (Some(next), None) => {
                let path = next.strip_prefix(&*state.origin).unwrap_or(next);
                let ok = visible(path) && path.starts_with('/') && !path.starts_with("//");
                if ok && crate::dashboard::dashboard_path(path) {
                    Ok(Destination::Dashboard(path.to_owned()))
                } else if ok && path.starts_with("/user/") {
                    Ok(Destination::Proxy(path.to_owned()))
                } else {
                    Err(ApiError::BadRequest(
                        "next must be a dashboard page (/admin…) or a server's page \
                         (/user/…) of this Berth"
                            .into(),
                    ))
                }
            }
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct StartQuery {
    /// A dashboard path (`/admin…`) or a server's URL on this Berth (`/user/…`,
    /// with or without the origin): where the browser goes once signed in.
    /// `BERTH_LOGIN_URL` may point here, so that the proxy sends browsers without a
    /// session straight to the provider.
    #[param(max_length = 2048)]
    next: Option<String>,
    /// A portal's page (its origin in `BERTH_CORS_ORIGINS`): the browser comes
    /// back to it with `?code=`, which the portal exchanges once, within a
    /// minute, at `POST /api/v1/auth/oidc/exchange`.
    #[param(max_length = 2048)]
    return_to: Option<String>,
}

/// Begins a sign-in: redirects the browser to the provider's login page.
#[utoipa::path(get, path = "/auth/oidc/{provider}/start", tag = "auth", security(()),
    params(ProviderParam, StartQuery),
    responses((status = 303, description = "To the provider's login page"), Errors))]
async fn start(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    Query(query): Query<StartQuery>,
) -> ApiResult<Response> {
    let provider = provider_of(&state, path)?;
    let destination =
        Destination::parse(&state, query.next.as_deref(), query.return_to.as_deref())?;
    let (url, cookie) = begin(
        &state,
        &headers,
        provider,
        FlowKind::Login,
        None,
        &destination,
    )
    .await?;
    Ok(see_other(&url, Some(cookie)))
}

#[derive(Debug, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct LinkRequest {
    /// A dashboard path to come back to (default: the account's page).
    #[serde(default)]
    next: Option<String>,
}

/// Where the browser goes to prove the identity.
#[derive(Debug, Serialize, ToSchema)]
struct LinkStart {
    /// Open this URL in the same browser that made this request: the sign-in is
    /// bound to it by a cookie, and refused in any other.
    authorization_url: String,
}

/// Begins linking an identity at the provider to the logged-in account: the user
/// proves both, the account by this request's session, the identity at the
/// provider.
#[utoipa::path(post, path = "/auth/oidc/{provider}/link", tag = "auth",
    params(ProviderParam), request_body = LinkRequest,
    responses((status = 200, description = "Where to prove the identity", body = LinkStart), Errors))]
async fn link(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    OptionalJson(body): OptionalJson<LinkRequest>,
) -> ApiResult<Response> {
    let provider = provider_of(&state, path)?;
    let Principal::User { user, .. } = &principal else {
        return Err(ApiError::Forbidden(
            "only a logged-in user links an identity to their account".into(),
        ));
    };
    let next = body.next;
    let destination = match next {
        Some(next) => Destination::parse(&state, Some(&next), None)?,
        None => Destination::Dashboard(format!("/admin/users/{}", user.name)),
    };
    let (url, cookie) = begin(
        &state,
        &headers,
        provider,
        FlowKind::Link,
        Some(user.id),
        &destination,
    )
    .await?;
    let mut response = Json(LinkStart {
        authorization_url: url,
    })
    .into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}

/// Begins linking from the dashboard (the operator's own account): where to send
/// the browser, with its binding cookie.
pub async fn begin_link(
    state: &AppState,
    headers: &HeaderMap,
    provider: &str,
    user: &UserRow,
) -> ApiResult<Response> {
    let provider = state
        .oidc
        .get(provider)
        .ok_or_else(|| ApiError::NotFound(format!("no sign-in provider is named {provider:?}")))?;
    let destination = Destination::Dashboard(format!("/admin/users/{}", user.name));
    let (url, cookie) = begin(
        state,
        headers,
        provider,
        FlowKind::Link,
        Some(user.id),
        &destination,
    )
    .await?;
    // A page that moves on rather than a redirect: the dashboard's policy
    // (`form-action 'self'`) stops a form's redirect to another origin.
    Ok(page(
        StatusCode::OK,
        "Linking",
        &format!("On to {} to prove the identity…", provider.config.display()),
        Some(&url),
        Some(cookie),
    ))
}

fn random_token() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// Records a sign-in and says where to send the browser, with the cookie that
/// binds the sign-in to it (the browser's existing one when it has one, so that
/// sign-ins in two tabs do not undo each other).
async fn begin(
    state: &AppState,
    headers: &HeaderMap,
    provider: &Provider,
    kind: FlowKind,
    user_id: Option<i64>,
    destination: &Destination,
) -> ApiResult<(String, HeaderValue)> {
    let (metadata, _) = state
        .oidc
        .learn(provider, false)
        .await
        .map_err(|e| unreachable_provider(provider, e))?;
    let browser = crate::auth::cookie(headers, BROWSER_COOKIE)
        .filter(|v| {
            v.len() == 43
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_owned)
        .unwrap_or_else(random_token);
    let flow_state = random_token();
    let nonce = random_token();
    let verifier = random_token();
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    let flow = OidcFlow {
        kind,
        provider: provider.config.name.clone(),
        browser_hash: Some(hash_opaque(&browser)),
        nonce: Some(nonce.clone()),
        verifier: Some(verifier),
        user_id,
        return_to: Some(destination.stored()),
        expires_at: Utc::now() + chrono::Duration::seconds(FLOW_SECS),
    };
    state
        .db
        .begin_flow(&hash_opaque(&flow_state), &flow)
        .await?;
    let mut url = reqwest::Url::parse(&metadata.authorization_endpoint).map_err(|e| {
        ApiError::BadGateway(format!(
            "{}'s authorization endpoint is not a URL: {e}",
            provider.config.display()
        ))
    })?;
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &provider.config.client_id)
        .append_pair("redirect_uri", &redirect_uri(state, provider))
        .append_pair("scope", &provider.config.scopes.join(" "))
        .append_pair("state", &flow_state)
        .append_pair("nonce", &nonce)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    let secure = if state.config.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{BROWSER_COOKIE}={browser}; Path=/api/v1/auth/oidc/; Max-Age={FLOW_SECS}; HttpOnly; \
         SameSite=Lax{secure}"
    );
    Ok((
        url.to_string(),
        HeaderValue::from_str(&cookie).expect("cookie is text"),
    ))
}

fn redirect_uri(state: &AppState, provider: &Provider) -> String {
    format!(
        "{}/api/v1/auth/oidc/{}/callback",
        state.origin, provider.config.name
    )
}

fn unreachable_provider(provider: &Provider, e: ProviderError) -> ApiError {
    tracing::warn!(provider = %provider.config.name, error = %e, "sign-in provider failed");
    ApiError::BadGateway(format!(
        "{} cannot be reached or answered wrongly; try again later",
        provider.config.display()
    ))
}

fn see_other(location: &str, cookie: Option<HeaderValue>) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    if let Some(cookie) = cookie {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct CallbackQuery {
    /// The sign-in this answers, as Berth sent it.
    #[param(max_length = 256)]
    state: Option<String>,
    /// The authorization code.
    #[param(max_length = 4096)]
    code: Option<String>,
    /// Why the provider did not sign the user in.
    #[param(max_length = 256)]
    error: Option<String>,
    #[param(max_length = 1024)]
    error_description: Option<String>,
}

/// The provider's answer: checks it, then opens the session (or links the
/// identity) and sends the browser on.
#[utoipa::path(get, path = "/auth/oidc/{provider}/callback", tag = "auth", security(()),
    params(ProviderParam, CallbackQuery),
    responses(
        (status = 200, description = "Signed in: a page that moves on to the dashboard", content_type = "text/html"),
        (status = 303, description = "Signed in: on to the server's page or the portal"),
        Errors))]
async fn callback(
    State(state): State<AppState>,
    headers: HeaderMap,
    addr: ClientAddr,
    path: Result<Path<String>, PathRejection>,
    Query(query): Query<CallbackQuery>,
) -> Response {
    let html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    match finish(&state, &headers, &addr, path, query).await {
        Ok(response) => response,
        Err(e) => {
            if html {
                let status = e.status();
                let message = e.public_message();
                page(status, "Sign-in refused", &message, None, None)
            } else {
                e.into_response()
            }
        }
    }
}

async fn finish(
    state: &AppState,
    headers: &HeaderMap,
    addr: &ClientAddr,
    path: Result<Path<String>, PathRejection>,
    query: CallbackQuery,
) -> ApiResult<Response> {
    let provider = provider_of(state, path)?;
    let name = &provider.config.name;
    let refused = |reason: String| async move {
        state
            .audit(
                None,
                "oidc_refused",
                None,
                addr,
                json!({ "provider": name, "reason": reason }),
            )
            .await;
        ApiError::BadRequest(reason)
    };
    let Some(flow_state) = query.state.as_deref().filter(|s| !s.is_empty()) else {
        return Err(refused("the answer names no sign-in (state)".into()).await);
    };
    // Spent now, whatever comes next: a callback is answered once.
    let flow = match state.db.take_flow(&hash_opaque(flow_state)).await? {
        Some(flow) if flow.provider == *name && flow.kind != FlowKind::Handoff => flow,
        _ => {
            return Err(refused(
                "this sign-in is unknown, was used already or has expired: start again".into(),
            )
            .await);
        }
    };
    let same_browser = match (
        crate::auth::cookie(headers, BROWSER_COOKIE),
        &flow.browser_hash,
    ) {
        (Some(cookie), Some(hash)) => crate::auth::same_secret(&hash_opaque(cookie), hash),
        _ => false,
    };
    if !same_browser {
        return Err(refused(
            "this sign-in was begun in another browser: start again in this one".into(),
        )
        .await);
    }
    if let Some(error) = &query.error {
        let description = query.error_description.as_deref().unwrap_or("");
        state
            .audit(
                None,
                "oidc_refused",
                None,
                addr,
                json!({ "provider": name, "reason": "the provider did not sign the user in",
                        "error": error, "description": description }),
            )
            .await;
        return Err(ApiError::Forbidden(format!(
            "{} did not sign you in ({error}{}{description})",
            provider.config.display(),
            if description.is_empty() { "" } else { ": " },
        )));
    }
    let Some(code) = query.code.as_deref().filter(|c| !c.is_empty()) else {
        return Err(refused("the answer carries no code".into()).await);
    };
    let claims = match redeem(state, provider, &flow, code).await {
        Ok(claims) => claims,
        Err(Redeem::Refused(reason)) => return Err(refused(reason).await),
        Err(Redeem::Provider(e)) => return Err(unreachable_provider(provider, e)),
    };
    let destination = Destination::from_stored(flow.return_to.as_deref());
    match flow.kind {
        FlowKind::Link => {
            let user_id = flow
                .user_id
                .ok_or_else(|| ApiError::Internal("a link without its account".into()))?;
            let user = state.db.user_by_id(user_id).await?.ok_or_else(|| {
                ApiError::NotFound("the account that began this link is gone".into())
            })?;
            state
                .db
                .link_identity(name, &claims.sub, user.id, claims.email.as_deref())
                .await?;
            state
                .audit(
                    Some(&format!("user:{}", user.name)),
                    "identity_linked",
                    Some(&user.name),
                    addr,
                    json!({ "provider": name, "subject": claims.sub }),
                )
                .await;
            let to = match destination {
                Destination::Dashboard(p) | Destination::Proxy(p) => p,
                Destination::Portal(u) => u,
            };
            Ok(page(
                StatusCode::OK,
                "Identity linked",
                &format!(
                    "Your {} identity is linked to the account {}.",
                    provider.config.display(),
                    user.name
                ),
                Some(&to),
                None,
            ))
        }
        _ => {
            let user = signed_in(state, provider, &claims, addr).await?;
            land(state, addr, provider, &user, destination).await
        }
    }
}

enum Redeem {
    Refused(String),
    Provider(ProviderError),
}

#[derive(Deserialize)]
struct TokenAnswer {
    id_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// Exchanges the code (with the flow's PKCE verifier) and checks the ID token.
async fn redeem(
    state: &AppState,
    provider: &Provider,
    flow: &OidcFlow,
    code: &str,
) -> Result<IdClaims, Redeem> {
    let (metadata, keys) = state
        .oidc
        .learn(provider, false)
        .await
        .map_err(Redeem::Provider)?;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", &redirect_uri(state, provider)),
        ("code_verifier", flow.verifier.as_deref().unwrap_or("")),
    ];
    // client_secret_basic: id and secret form-urlencoded, then Basic (RFC 6749, 2.3.1).
    let encode = |s: &str| crate::dashboard::encode(s);
    let response = state
        .oidc
        .http()
        .post(&metadata.token_endpoint)
        .basic_auth(
            encode(&provider.config.client_id),
            Some(encode(&provider.config.client_secret)),
        )
        .header(reqwest::header::ACCEPT, "application/json")
        .form(&form)
        .send()
        .await
        .map_err(|e| {
            Redeem::Provider(ProviderError::Unreachable(format!(
                "the token endpoint: {e}"
            )))
        })?;
    let status = response.status();
    let answer: TokenAnswer = response.json().await.map_err(|e| {
        Redeem::Provider(ProviderError::Invalid(format!(
            "the token endpoint answered {status} without JSON: {e}"
        )))
    })?;
    let Some(id_token) = answer.id_token.filter(|_| status.is_success()) else {
        return match answer.error {
            Some(error) => Err(Redeem::Refused(format!(
                "{} did not accept the code ({error}{}{})",
                provider.config.display(),
                if answer.error_description.is_some() {
                    ": "
                } else {
                    ""
                },
                answer.error_description.unwrap_or_default()
            ))),
            None => Err(Redeem::Provider(ProviderError::Invalid(format!(
                "the token endpoint answered {status} without an ID token"
            )))),
        };
    };
    let nonce = flow.nonce.as_deref().unwrap_or("");
    let expected = |issuer| super::Expected {
        issuer,
        client_id: &provider.config.client_id,
        nonce,
    };
    let checked = match super::verify(&id_token, &keys, expected(&metadata.issuer)) {
        // Keys rotate: a key id not yet seen is looked up once more.
        Err(IdTokenError::UnknownKey) => {
            let (metadata, keys) = state
                .oidc
                .learn(provider, true)
                .await
                .map_err(Redeem::Provider)?;
            super::verify(&id_token, &keys, expected(&metadata.issuer))
        }
        other => other,
    };
    checked.map_err(|e| Redeem::Refused(format!("the provider's ID token was refused: {e}")))
}

/// The account an ID token signs in: the linked one, or a new one when the
/// provider may create accounts; its groups and role as the provider says.
async fn signed_in(
    state: &AppState,
    provider: &Provider,
    claims: &IdClaims,
    addr: &ClientAddr,
) -> ApiResult<UserRow> {
    let name = &provider.config.name;
    let email = claims.email.as_deref().map(str::to_lowercase);
    let user = match state
        .db
        .identity_login(name, &claims.sub, email.as_deref())
        .await?
    {
        Some(user) => user,
        None => sign_up(state, provider, claims, addr).await?,
    };
    if !user.active {
        state
            .audit(
                None,
                "login_failed",
                Some(&user.name),
                addr,
                json!({ "method": "oidc", "provider": name, "reason": "deactivated" }),
            )
            .await;
        return Err(ApiError::Forbidden("this account is deactivated".into()));
    }
    follow_claims(state, provider, claims, user, addr).await
}

/// The groups a claim lists (a list of names, or one name), those Berth can use.
fn groups_in(provider: &Provider, claims: &IdClaims) -> Option<Vec<String>> {
    let claim = provider.config.groups_claim.as_deref()?;
    let mut groups: Vec<String> = match claims.other.get(claim) {
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .filter_map(|v| v.as_str())
            .map(str::to_owned)
            .collect(),
        Some(serde_json::Value::String(one)) => vec![one.clone()],
        _ => Vec::new(),
    };
    groups.retain(|g| schema::profiles::check_group(g).is_ok());
    groups.sort();
    groups.dedup();
    groups.truncate(100);
    Some(groups)
}

/// The role the provider's groups give, when it decides roles.
fn role_in(provider: &Provider, claims: &IdClaims) -> Option<Role> {
    let admin_groups = &provider.config.admin_groups;
    if admin_groups.is_empty() {
        return None;
    }
    let claim = provider.config.groups_claim.as_deref().unwrap_or("groups");
    let member = |g: &str| admin_groups.iter().any(|a| a == g);
    let admin = match claims.other.get(claim) {
        Some(serde_json::Value::Array(list)) => list.iter().filter_map(|v| v.as_str()).any(member),
        Some(serde_json::Value::String(one)) => member(one),
        _ => false,
    };
    Some(if admin { Role::Admin } else { Role::User })
}

/// Brings an account's groups and role in line with what the provider says now.
async fn follow_claims(
    state: &AppState,
    provider: &Provider,
    claims: &IdClaims,
    mut user: UserRow,
    addr: &ClientAddr,
) -> ApiResult<UserRow> {
    let actor = format!("oidc:{}", provider.config.name);
    let name = UserName::parse(&user.name)?;
    if let Some(groups) = groups_in(provider, claims)
        && groups != user.groups()
    {
        user = state.db.set_groups(&name, &groups).await?;
        state
            .audit(
                Some(&actor),
                "groups_changed",
                Some(&user.name),
                addr,
                json!({ "groups": groups }),
            )
            .await;
    }
    // The bootstrap admin is never demoted by a provider: it is the way back in.
    let bootstrap = state.config.admin_user.as_deref() == Some(user.name.as_str());
    if let Some(role) = role_in(provider, claims)
        && role != user.role
        && !(bootstrap && role == Role::User)
    {
        user = state.db.set_role(&name, role).await?;
        state
            .audit(
                Some(&actor),
                "role_changed",
                Some(&user.name),
                addr,
                json!({ "role": role.as_str() }),
            )
            .await;
    }
    Ok(user)
}

/// A user name from what the provider calls the user: `[a-z0-9-]`, at most 32.
fn name_from(claims: &IdClaims) -> String {
    let wanted = claims
        .preferred_username
        .as_deref()
        .or_else(|| claims.email.as_deref().and_then(|e| e.split('@').next()))
        .unwrap_or("user")
        .to_lowercase();
    let mut name = String::new();
    for c in wanted.chars() {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && (name.is_empty() || name.ends_with('-'))) {
            name.push(c);
        }
    }
    name.truncate(28);
    let name = name.trim_end_matches('-');
    if name.is_empty() {
        "user".into()
    } else {
        name.to_owned()
    }
}

/// Creates the account of an identity no account is linked to, when the
/// provider may: a verified email of an allowed domain, not an existing
/// account's (that account links the identity itself, proving both).
async fn sign_up(
    state: &AppState,
    provider: &Provider,
    claims: &IdClaims,
    addr: &ClientAddr,
) -> ApiResult<UserRow> {
    let config = &provider.config;
    let display = config.display();
    let refuse = |reason: String| async move {
        state
            .audit(
                None,
                "signup_refused",
                None,
                addr,
                json!({ "provider": config.name, "subject": claims.sub, "reason": reason }),
            )
            .await;
        reason
    };
    if !config.allow_signup {
        return Err(ApiError::Forbidden(
            refuse(format!(
                "no Berth account is linked to this {display} identity: ask an admin for an \
                 account, or log in with your password and link {display} to it"
            ))
            .await,
        ));
    }
    let email = match (&claims.email, claims.email_verified) {
        (Some(email), Some(true)) => email.to_lowercase(),
        _ => {
            return Err(ApiError::Forbidden(
                refuse(format!(
                    "{display} did not give a verified email address, which a new account needs"
                ))
                .await,
            ));
        }
    };
    let domain = email.rsplit('@').next().unwrap_or("");
    if !config.allowed_domains.is_empty() && !config.allowed_domains.iter().any(|d| d == domain) {
        return Err(ApiError::Forbidden(
            refuse(format!(
                "accounts for {domain} addresses are not created from {display}: ask an admin"
            ))
            .await,
        ));
    }
    crate::accounts::check_email(&email)?;
    let taken = |state: &AppState| {
        let email = email.clone();
        let state = state.clone();
        async move { state.db.find_login(&email).await.map(|u| u.is_some()) }
    };
    if taken(state).await? {
        return Err(ApiError::Conflict(
            refuse(format!(
                "an account with the email {email} exists: log in to it with its password and \
                 link {display} from there"
            ))
            .await,
        ));
    }
    let groups = groups_in(provider, claims).unwrap_or_default();
    let role = role_in(provider, claims).unwrap_or(Role::User);
    let base = name_from(claims);
    let reserved = state.config.admin_user.as_deref();
    for n in 1..=50 {
        let candidate = if n == 1 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        if reserved == Some(candidate.as_str()) {
            continue;
        }
        let account = NewAccount {
            name: UserName::parse(&candidate)?,
            email: Some(email.clone()),
            password_hash: None,
            role,
        };
        match state
            .db
            .register_identity(&account, &groups, &config.name, &claims.sub)
            .await
        {
            Ok(user) => {
                state
                    .audit(
                        Some(&format!("oidc:{}", config.name)),
                        "user_registered",
                        Some(&user.name),
                        addr,
                        json!({ "method": "oidc", "provider": config.name, "subject": claims.sub,
                                "groups": groups, "role": role.as_str() }),
                    )
                    .await;
                return Ok(user);
            }
            Err(StoreError::Conflict(message)) => {
                // Signed up at the same moment in another tab: that account.
                if message.contains("identity is linked")
                    && let Some(user) = state
                        .db
                        .identity_login(&config.name, &claims.sub, Some(&email))
                        .await?
                {
                    return Ok(user);
                }
                if taken(state).await? {
                    return Err(ApiError::Conflict(format!(
                        "an account with the email {email} exists: log in to it with its \
                         password and link {display} from there"
                    )));
                }
                // The name is taken: the next one.
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict(format!(
        "no free user name like {base:?} is left: ask an admin for an account"
    )))
}

/// Sends a signed-in browser where its sign-in was going.
async fn land(
    state: &AppState,
    addr: &ClientAddr,
    provider: &Provider,
    user: &UserRow,
    destination: Destination,
) -> ApiResult<Response> {
    let how = json!({ "method": "oidc", "provider": provider.config.name });
    match destination {
        Destination::Dashboard(path) => {
            let (token, _) = open_session(state, addr, user, how).await?;
            // The session cookie is SameSite=Strict, which a browser does not send
            // on a redirect chain that began at the provider: this page moves on
            // from Berth's own origin instead.
            Ok(page(
                StatusCode::OK,
                "Signed in",
                &format!("You are signed in as {}.", user.name),
                Some(&path),
                Some(crate::dashboard::session_cookie(state, &token)),
            ))
        }
        Destination::Proxy(path) => {
            let (_, claims) = open_session(state, addr, user, how).await?;
            let value = new_opaque("bps_");
            state
                .db
                .create_proxy_session(
                    &hash_opaque(&value),
                    user.id,
                    crate::tokens::expiry(&claims),
                    Some(claims.jti),
                    addr.0.as_deref(),
                )
                .await?;
            let cookie = crate::proxy::access::set_cookie(state, &user.name, &value);
            Ok(see_other(
                &format!("{}{path}", state.origin),
                HeaderValue::from_str(&cookie).ok(),
            ))
        }
        Destination::Portal(url) => {
            let code = new_opaque("boh_");
            let flow = OidcFlow {
                kind: FlowKind::Handoff,
                provider: provider.config.name.clone(),
                browser_hash: None,
                nonce: None,
                verifier: None,
                user_id: Some(user.id),
                return_to: None,
                expires_at: Utc::now() + chrono::Duration::seconds(HANDOFF_SECS),
            };
            state.db.begin_flow(&hash_opaque(&code), &flow).await?;
            state
                .audit(
                    Some(&format!("user:{}", user.name)),
                    "oidc_handoff",
                    Some(&user.name),
                    addr,
                    json!({ "provider": provider.config.name, "return_to": url }),
                )
                .await;
            let mut url = reqwest::Url::parse(&url)
                .map_err(|e| ApiError::Internal(format!("a stored return_to: {e}")))?;
            url.query_pairs_mut().append_pair("code", &code);
            Ok(see_other(url.as_str(), None))
        }
    }
}

/// A small page of Berth's own: what happened, and where it moves on to.
fn page(
    status: StatusCode,
    title: &str,
    message: &str,
    next: Option<&str>,
    cookie: Option<HeaderValue>,
) -> Response {
    let body = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                @if let Some(next) = next { meta http-equiv="refresh" content=(format!("0;url={next}")); }
                title { (title) " · Berth" }
            }
            body {
                main {
                    h1 { (title) }
                    p #message { (message) }
                    @if let Some(next) = next { p { a #continue href=(next) { "Continue" } } }
                }
            }
        }
    };
    let mut response = (status, body).into_response();
    if let Some(cookie) = cookie {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Exchange {
    /// The `code` the portal's page was given.
    #[schema(max_length = 256)]
    code: String,
}

/// A portal exchanges the hand-off code its page was given for the user's
/// session: once, within a minute.
#[utoipa::path(post, path = "/auth/oidc/exchange", tag = "auth", security(()),
    request_body = Exchange,
    responses((status = 200, description = "The session", body = Session), Errors))]
async fn exchange(
    State(state): State<AppState>,
    addr: ClientAddr,
    JsonBody(body): JsonBody<Exchange>,
) -> ApiResult<Json<Session>> {
    let unknown =
        || ApiError::BadRequest("this code is unknown, was used already or has expired".into());
    let flow = state
        .db
        .take_flow(&hash_opaque(&body.code))
        .await?
        .filter(|f| f.kind == FlowKind::Handoff)
        .ok_or_else(unknown)?;
    let user = match flow.user_id {
        Some(id) => state.db.user_by_id(id).await?,
        None => None,
    }
    .filter(|u| u.active)
    .ok_or_else(unknown)?;
    let how = json!({ "method": "oidc", "provider": flow.provider, "via": "portal" });
    let (token, _) = open_session(&state, &addr, &user, how).await?;
    Ok(Json(Session::new(&state, token, &user)))
}

/// An account's identity at a provider.
#[derive(Debug, Serialize, ToSchema)]
struct IdentityView {
    provider: String,
    display_name: String,
    /// Who the user is at the provider.
    subject: String,
    email: Option<String>,
    linked: DateTime<Utc>,
    last_login: Option<DateTime<Utc>>,
}

/// The identities at providers linked to an account.
#[utoipa::path(get, path = "/users/{user}/identities", tag = "users", params(UserParam),
    responses((status = 200, description = "The identities", body = Vec<IdentityView>), Errors))]
async fn identities(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Vec<IdentityView>>> {
    let name = user_name(path)?;
    principal.may("users:read", &name)?;
    let user = state
        .db
        .get_user(&name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no user {name}")))?;
    Ok(Json(identity_views(&state, user.id).await?))
}

async fn identity_views(state: &AppState, user_id: i64) -> ApiResult<Vec<IdentityView>> {
    Ok(state
        .db
        .identities_of(user_id)
        .await?
        .into_iter()
        .map(|i| IdentityView {
            display_name: state
                .oidc
                .get(&i.provider)
                .map_or(i.provider.clone(), |p| p.config.display().to_owned()),
            provider: i.provider,
            subject: i.subject,
            email: i.email,
            linked: i.created_at,
            last_login: i.last_login_at,
        })
        .collect())
}

/// A user and a provider in a path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct IdentityParams {
    #[param(pattern = "^[a-z0-9]+(-[a-z0-9]+)*$", max_length = 32)]
    user: String,
    #[param(pattern = "^[a-z0-9-]{1,32}$")]
    provider: String,
}

/// Unlinks an identity; never the account's last way in (set a password first).
#[utoipa::path(delete, path = "/users/{user}/identities/{provider}", tag = "users",
    params(IdentityParams),
    responses((status = 204, description = "Unlinked"), Errors))]
async fn unlink(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<StatusCode> {
    let Path((user, provider)) = path?;
    let name = UserName::parse(&user)?;
    principal.may("users:write", &name)?;
    unlink_identity(&state, &principal.actor(), &addr, &name, &provider).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Unlinks, audited; shared by the API and the dashboard.
pub async fn unlink_identity(
    state: &AppState,
    actor: &str,
    addr: &ClientAddr,
    name: &UserName,
    provider: &str,
) -> ApiResult<()> {
    let user = state
        .db
        .get_user(name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no user {name}")))?;
    let linked = state.db.identities_of(user.id).await?;
    if !linked.iter().any(|i| i.provider == provider) {
        return Err(ApiError::NotFound(format!(
            "{name} has no identity at {provider:?} linked"
        )));
    }
    if user.password_hash.is_none() && linked.len() == 1 {
        return Err(ApiError::Conflict(format!(
            "this is the only way into {name}'s account: set a password first"
        )));
    }
    if state.db.unlink_identity(user.id, provider).await? {
        state
            .audit(
                Some(actor),
                "identity_unlinked",
                Some(name.as_str()),
                addr,
                json!({ "provider": provider }),
            )
            .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(preferred: Option<&str>, email: Option<&str>) -> IdClaims {
        serde_json::from_value(json!({
            "sub": "s", "preferred_username": preferred, "email": email,
        }))
        .unwrap()
    }

    #[test]
    fn user_names_from_claims_are_berth_names() {
        for (preferred, email, want) in [
            (Some("Ann.Lee"), None, "ann-lee"),
            (None, Some("Bob_Smith+lab@example.org"), "bob-smith-lab"),
            (Some("--é--x"), None, "x"),
            (Some("...."), None, "user"),
            (None, None, "user"),
            (Some(&*"a".repeat(60)), None, &*"a".repeat(28)),
        ] {
            let name = name_from(&claims(preferred, email));
            assert_eq!(name, want);
            UserName::parse(&name).expect("a valid name");
        }
    }
}
