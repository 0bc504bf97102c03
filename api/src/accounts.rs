//! `/api/v1/auth`: register, log in, log out, who am I, change password; and the
//! public key set that verifies access tokens.

use axum::{Json, extract::State, http::StatusCode};
use schema::{NewAccount, Role, StoreError, UserName, accounts::ThrottleRule, prelude::*};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    auth::{ClientAddr, Principal},
    body::JsonBody,
    error::{ApiError, ApiResult},
    openapi::Errors,
    passwords,
    tokens::expiry,
    views::UserView,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(login))
        .routes(routes!(logout))
        .routes(routes!(me))
        .routes(routes!(change_password))
        .routes(routes!(jwks))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Registration {
    #[schema(pattern = "^[a-z0-9]+(-[a-z0-9]+)*$", max_length = 32)]
    username: String,
    #[serde(default)]
    #[schema(
        pattern = "^[A-Za-z0-9._+%'~-]{1,64}@[A-Za-z0-9_+%~-]+(\\.[A-Za-z0-9_+%~-]+)+$",
        max_length = 254
    )]
    email: Option<String>,
    /// 10 to 256 characters, not one repeated.
    #[schema(min_length = 10, max_length = 256, pattern = "^(?!(.)\\1*$)")]
    password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Login {
    /// A user name or an email address.
    #[serde(alias = "email", alias = "login")]
    pub(crate) username: String,
    pub(crate) password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PasswordChange {
    current_password: String,
    /// 10 to 256 characters, not one repeated.
    #[schema(min_length = 10, max_length = 256, pattern = "^(?!(.)\\1*$)")]
    new_password: String,
}

/// A plausible email address: one `@`, a dotted domain, no spaces, at most 254 characters.
/// An address of the usual form: `local@domain.tld`, printable, no markup or
/// quoting (NUL and `<script>` were accepted and shown back).
pub fn check_email(email: &str) -> Result<(), ApiError> {
    let plain = |part: &str| {
        !part.is_empty()
            && part.chars().all(|c| {
                c.is_alphanumeric() || matches!(c, '.' | '_' | '-' | '+' | '%' | '\'' | '~')
            })
    };
    let ok = email.len() <= 254
        && matches!(email.split_once('@'), Some((local, domain))
            if plain(local) && local.len() <= 64 && plain(domain) && !domain.contains('\'')
            && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
            && !domain.contains(".."));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(
            "the email is not an address of the form name@example.org".into(),
        ))
    }
}

pub async fn new_account(
    name: &str,
    email: Option<String>,
    password: Option<String>,
    role: Role,
) -> ApiResult<NewAccount> {
    let name = UserName::parse(name)?;
    if let Some(email) = &email {
        check_email(email)?;
    }
    let password_hash = match password {
        Some(password) => {
            passwords::check_strength(&password).map_err(ApiError::BadRequest)?;
            Some(passwords::hash(password).await?)
        }
        None => None,
    };
    Ok(NewAccount {
        name,
        email,
        password_hash,
        role,
    })
}

/// Creates an account with the `user` role, when self-registration is on.
#[utoipa::path(post, path = "/auth/register", tag = "auth", security(()),
    request_body = Registration,
    responses((status = 201, description = "The new account", body = UserView), Errors))]
async fn register(
    State(state): State<AppState>,
    addr: ClientAddr,
    JsonBody(body): JsonBody<Registration>,
) -> ApiResult<(StatusCode, Json<UserView>)> {
    if !state.config.allow_registration {
        return Err(ApiError::Forbidden(
            "self-registration is switched off; ask an admin for an account".into(),
        ));
    }
    // The bootstrap admin's name is never free for anyone to take: should its
    // account be deleted, the next start creates it again.
    let account = new_account(&body.username, body.email, Some(body.password), Role::User).await?;
    if state.config.admin_user.as_deref() == Some(account.name.as_str()) {
        return Err(ApiError::Forbidden(format!(
            "the name {:?} is reserved",
            account.name.as_str()
        )));
    }
    let rule = ThrottleRule {
        max_failures: state.config.registrations_per_address,
        window_secs: state.config.login_throttle_window,
    };
    let key = format!("register:{}", addr.0.as_deref().unwrap_or("unknown"));
    if let Some(wait) = state.db.reserve_attempt(&[(&key, rule)]).await? {
        return Err(ApiError::TooManyRequests {
            message: format!("too many registrations from this address; try again in {wait} s"),
            retry_after: Some(wait),
        });
    }
    // Taken, whether the name or the email: the answer does not say which.
    let user = match state.db.register(&account).await {
        Err(StoreError::Conflict(_)) => {
            return Err(ApiError::Conflict(
                "this name or email cannot be registered; choose another".into(),
            ));
        }
        registered => registered?,
    };
    state
        .audit(None, "user_registered", Some(&user.name), &addr, json!({}))
        .await;
    Ok((
        StatusCode::CREATED,
        Json(UserView::new(&user, &[], state.public_addresses())),
    ))
}

/// An open session: its access token and the account.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Session {
    /// A JWT to send as `Authorization: Bearer <token>`.
    access_token: String,
    /// Always `bearer`.
    token_type: &'static str,
    /// Seconds until the token expires.
    expires_in: u64,
    user: UserView,
}

/// Opens a session. The same answer for an unknown account and a wrong password,
/// in the same time.
#[utoipa::path(post, path = "/auth/login", tag = "auth", security(()),
    request_body = Login,
    responses((status = 200, description = "The session", body = Session), Errors))]
async fn login(
    State(state): State<AppState>,
    addr: ClientAddr,
    JsonBody(body): JsonBody<Login>,
) -> ApiResult<Json<Session>> {
    let (token, user) = log_in(&state, &addr, body).await?;
    Ok(Json(Session::new(&state, token, &user)))
}

impl Session {
    pub(crate) fn new(state: &AppState, access_token: String, user: &schema::UserRow) -> Self {
        Session {
            access_token,
            token_type: "bearer",
            expires_in: state.config.token_ttl,
            user: UserView::new(user, &[], state.public_addresses()),
        }
    }
}

/// Checks a login (throttled, audited) and opens a session: the access token and
/// the account. Shared by the API and the dashboard's login form.
pub(crate) async fn log_in(
    state: &AppState,
    addr: &ClientAddr,
    body: Login,
) -> ApiResult<(String, schema::UserRow)> {
    // The account is the key, however it is named (its name or its email);
    // a login that names no account is keyed by what it named.
    let user = state.db.find_login(&body.username).await?;
    let account_key = match &user {
        Some(user) => format!("account:{}", user.id),
        None => format!("login:{}", body.username.to_lowercase()),
    };
    let addr_key = format!("addr:{}", addr.0.as_deref().unwrap_or("unknown"));
    let window = state.config.login_throttle_window;
    let per_account = ThrottleRule {
        max_failures: state.config.login_max_failures,
        window_secs: window,
    };
    let per_addr = ThrottleRule {
        max_failures: state.config.login_max_failures_per_address,
        window_secs: window,
    };
    // Counted before the password is checked, so that concurrent guesses cannot
    // all be checked before the first of them is counted.
    if let Some(wait) = state
        .db
        .reserve_attempt(&[(&account_key, per_account), (&addr_key, per_addr)])
        .await?
    {
        return Err(ApiError::TooManyRequests {
            message: format!("too many failed logins; try again in {wait} s"),
            retry_after: Some(wait),
        });
    }
    let valid = passwords::verify(
        body.password,
        user.as_ref().and_then(|u| u.password_hash.clone()),
    )
    .await?;
    // A deactivated account answers as a wrong password does, so that the answer
    // does not tell a guesser the password was right.
    let user = match user {
        Some(user) if valid && user.active => user,
        refused => {
            let detail = match &refused {
                Some(user) if valid && !user.active => json!({ "reason": "deactivated" }),
                _ => json!({}),
            };
            state
                .audit(None, "login_failed", Some(&body.username), addr, detail)
                .await;
            return Err(ApiError::InvalidCredentials(
                "wrong user name or password".into(),
            ));
        }
    };
    state.db.clear_failures(&account_key).await?;
    state.db.release_attempt(&addr_key).await?;
    let (token, _) = open_session(state, addr, &user, json!({})).await?;
    Ok((token, user))
}

/// Opens a revocable session for `user`, who proved who they are (`detail`
/// says how, in the audit log): the access token and its claims.
pub(crate) async fn open_session(
    state: &AppState,
    addr: &ClientAddr,
    user: &schema::UserRow,
    detail: Value,
) -> ApiResult<(String, crate::tokens::Claims)> {
    let (token, claims) = state
        .keys
        .issue(&user.name, user.role.as_str(), state.config.token_ttl)
        .map_err(ApiError::Internal)?;
    state
        .db
        .create_session(claims.jti, user.id, expiry(&claims), addr.0.as_deref())
        .await?;
    state
        .audit(
            Some(&format!("user:{}", user.name)),
            "login_succeeded",
            Some(&user.name),
            addr,
            detail,
        )
        .await;
    Ok((token, claims))
}

/// Revokes the session behind this token on every API process at once.
#[utoipa::path(post, path = "/auth/logout", tag = "auth",
    responses((status = 204, description = "The session is revoked"), Errors))]
async fn logout(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
) -> ApiResult<StatusCode> {
    let Principal::User { user, jti } = &principal else {
        return Err(ApiError::Forbidden(
            "only login sessions log out; revoke service tokens instead".into(),
        ));
    };
    state.db.revoke_session(*jti).await?;
    state
        .audit(
            Some(&principal.actor()),
            "logout",
            Some(&user.name),
            &addr,
            json!({}),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Who the caller is.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Me {
    /// A logged-in user, with their servers.
    User { user: UserView },
    /// An API token.
    Service { name: String, scopes: Vec<String> },
    /// A server's own token.
    Server { user: String, server: String },
}

/// Who the credentials belong to.
#[utoipa::path(get, path = "/auth/me", tag = "auth",
    responses((status = 200, description = "The caller", body = Me), Errors))]
async fn me(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<Me>> {
    Ok(Json(match principal {
        Principal::User { user, .. } => {
            let servers = state.db.servers_of(&[user.id]).await?;
            Me::User {
                user: UserView::new(&user, &servers, state.public_addresses()),
            }
        }
        Principal::Service { name, scopes } => Me::Service { name, scopes },
        Principal::Server { server } => Me::Server {
            user: server.user_name,
            server: server.name,
        },
    }))
}

/// Changes the password and ends every other session of the account.
#[utoipa::path(post, path = "/auth/password", tag = "auth", request_body = PasswordChange,
    responses((status = 204, description = "Changed; other sessions ended"), Errors))]
async fn change_password(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    JsonBody(body): JsonBody<PasswordChange>,
) -> ApiResult<StatusCode> {
    let Principal::User { user, jti } = &principal else {
        return Err(ApiError::Forbidden(
            "only a logged-in user changes a password".into(),
        ));
    };
    // Guessing the current password with a stolen session is throttled and
    // audited like a login.
    let account_key = format!("account:{}", user.id);
    let rule = ThrottleRule {
        max_failures: state.config.login_max_failures,
        window_secs: state.config.login_throttle_window,
    };
    if let Some(wait) = state.db.reserve_attempt(&[(&account_key, rule)]).await? {
        return Err(ApiError::TooManyRequests {
            message: format!("too many wrong passwords; try again in {wait} s"),
            retry_after: Some(wait),
        });
    }
    if !passwords::verify(body.current_password, user.password_hash.clone()).await? {
        state
            .audit(
                Some(&principal.actor()),
                "password_change_failed",
                Some(&user.name),
                &addr,
                json!({}),
            )
            .await;
        return Err(ApiError::InvalidCredentials(
            "the current password is wrong".into(),
        ));
    }
    state.db.clear_failures(&account_key).await?;
    passwords::check_strength(&body.new_password).map_err(ApiError::BadRequest)?;
    let hash = passwords::hash(body.new_password).await?;
    state.db.set_password(user.id, &hash, Some(*jti)).await?;
    state
        .audit(
            Some(&principal.actor()),
            "password_changed",
            Some(&user.name),
            &addr,
            json!({}),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// The public keys that verify access tokens (RFC 7517).
#[utoipa::path(get, path = "/auth/jwks", tag = "auth", security(()),
    responses((status = 200, description = "The key set", body = Object), Errors))]
async fn jwks(State(state): State<AppState>) -> Json<Value> {
    Json(state.keys.jwks())
}
