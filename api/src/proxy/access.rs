//! Who is asking, at the proxy: a browser with the proxy's session cookie (made
//! from an SSO hand-off), or an API client with `Authorization: Bearer` (a user's
//! JWT, or a service token with the `servers:access` scope). What a credential
//! proves is kept for a couple of seconds, so the hot path rarely reads the
//! store, and a logout, deactivation or password change ends access within that.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};

use schema::{Route, prelude::*};

use crate::{
    AppState,
    auth::Principal,
    error::ApiError,
    tokens::{hash_opaque, new_opaque},
};

/// The proxy's session cookie, scoped to one user's path.
pub const COOKIE: &str = "berth_proxy";
/// The scope that lets a service token through the proxy (not implied by `admin`).
pub const ACCESS_SCOPE: &str = "servers:access";

/// How long what a credential proved is trusted.
const TTL: Duration = Duration::from_secs(2);
/// Credentials kept before stale ones are swept.
const MOST: usize = 50_000;

/// Who a credential belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visitor {
    User {
        id: i64,
        name: String,
    },
    /// A service token; `access` when it carries `servers:access`.
    Service {
        name: String,
        access: bool,
    },
    /// A credential that proves nothing the proxy honours (a server's own token).
    Nobody,
}

/// How the visitor proved it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    Cookie,
    Bearer,
}

/// What a credential proved, and when.
type Proved = (Option<Visitor>, Instant);

#[derive(Default)]
pub struct AccessCache {
    entries: Mutex<HashMap<[u8; 32], Proved>>,
}

impl AccessCache {
    async fn resolve(
        &self,
        key: [u8; 32],
        check: impl Future<Output = Result<Option<Visitor>, ApiError>>,
    ) -> Result<Option<Visitor>, ApiError> {
        if let Some((visitor, at)) = self.entries.lock().expect("access cache").get(&key)
            && at.elapsed() < TTL
        {
            return Ok(visitor.clone());
        }
        let visitor = check.await?;
        let mut entries = self.entries.lock().expect("access cache");
        if entries.len() >= MOST {
            entries.retain(|_, (_, at)| at.elapsed() < TTL);
        }
        entries.insert(key, (visitor.clone(), Instant::now()));
        Ok(visitor)
    }

    /// Forgets a credential at once (its session was ended here).
    pub fn forget_cookie(&self, value: &str) {
        self.entries
            .lock()
            .expect("access cache")
            .remove(&key("cookie", value));
    }
}

fn key(kind: &str, secret: &str) -> [u8; 32] {
    let mut digest = Sha256::new();
    digest.update(kind.as_bytes());
    digest.update([0]);
    digest.update(secret.as_bytes());
    digest.finalize().into()
}

/// The visitor a request's credentials name: its bearer token if it has one,
/// else its session cookie; `None` when it has neither or they prove nothing.
pub async fn visitor(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<(Visitor, By)>, ApiError> {
    if let Some(token) = bearer(headers) {
        let found = state
            .proxy
            .access
            .resolve(key("bearer", token), async {
                match Principal::from_token(state, token).await {
                    Ok(Principal::User { user, .. }) => Ok(Some(Visitor::User {
                        id: user.id,
                        name: user.name,
                    })),
                    Ok(Principal::Service { name, scopes }) => Ok(Some(Visitor::Service {
                        name,
                        access: scopes.iter().any(|s| s == ACCESS_SCOPE),
                    })),
                    Ok(Principal::Server { .. }) => Ok(Some(Visitor::Nobody)),
                    Err(ApiError::Unauthorized(_)) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        return Ok(found.map(|v| (v, By::Bearer)));
    }
    let Some(value) = crate::auth::cookie(headers, COOKIE) else {
        return Ok(None);
    };
    let found = state
        .proxy
        .access
        .resolve(key("cookie", value), async {
            Ok(state
                .db
                .proxy_session_user(&hash_opaque(value))
                .await?
                .map(|user| Visitor::User {
                    id: user.id,
                    name: user.name,
                }))
        })
        .await?;
    Ok(found.map(|v| (v, By::Cookie)))
}

/// Spends an SSO hand-off token for `route`'s server and opens a proxy session
/// for its user: the cookie's value. `None` when the token is unknown, spent,
/// expired or for another server.
pub async fn land(
    state: &AppState,
    route: &Route,
    token: &str,
    client: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let Some(grant) = state
        .db
        .consume_sso(&hash_opaque(token), Some(route.server_id))
        .await?
    else {
        return Ok(None);
    };
    let session = new_opaque("bps_");
    let ttl = chrono::Duration::seconds(state.config.token_ttl.min(i64::MAX as u64) as i64);
    state
        .db
        .create_proxy_session(
            &hash_opaque(&session),
            grant.user_id,
            chrono::Utc::now() + ttl,
            grant.session_jti,
            client,
        )
        .await?;
    Ok(Some(session))
}

/// The `Set-Cookie` value of a proxy session for `user` (empty: removes it).
pub fn set_cookie(state: &AppState, user: &str, value: &str) -> String {
    let age = if value.is_empty() {
        0
    } else {
        state.config.token_ttl
    };
    let secure = if state.config.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    // Scoped to the user's own path, HttpOnly: code served from one user's server
    // can neither read it nor have a browser send it to another user's.
    format!("{COOKIE}={value}; Path=/user/{user}/; Max-Age={age}; HttpOnly; SameSite=Lax{secure}")
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}
