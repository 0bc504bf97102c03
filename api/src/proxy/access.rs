//! Who is asking, at the proxy: a browser with the proxy's session cookie (made
//! from an SSO hand-off), or an API client with `Authorization: Bearer` (a user's
//! JWT, or a service token with the `servers:access` scope). What a credential
//! proves is kept for a couple of seconds, so the hot path rarely reads the
//! store, and a logout, deactivation or password change ends access within that.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::http::HeaderMap;
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

/// How long what a credential proved is trusted (a request checking it again
/// may take a little longer).
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

impl Visitor {
    /// Who the visitor is, as the audit log and the stream limits name callers.
    pub fn caller(&self) -> String {
        match self {
            Visitor::User { name, .. } => format!("user:{name}"),
            Visitor::Service { name, .. } => format!("token:{name}"),
            Visitor::Nobody => "nobody".into(),
        }
    }
}

/// How the visitor proved it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    Cookie,
    Bearer,
}

/// What a credential proved, when, and whether a request is checking it again.
struct Proved {
    visitor: Option<Visitor>,
    at: Instant,
    checking: bool,
}

/// What credentials of one kind proved, each by its value.
#[derive(Default)]
struct Credentials {
    proved: Mutex<HashMap<String, Proved>>,
    /// One check at a time of a credential not seen yet: the others wait for it.
    first: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Bearer tokens and cookies.
#[derive(Default)]
pub struct AccessCache {
    bearers: Credentials,
    cookies: Credentials,
}

impl Credentials {
    /// What `credential` proved while fresh; `None` when it must be checked.
    /// Once stale, one request checks again while the others go on with what
    /// it last proved, so that a busy credential does not send every request
    /// in flight to the store at once.
    fn known(&self, credential: &str) -> Option<Option<Visitor>> {
        let mut proved = self.proved.lock().expect("access cache");
        let entry = proved.get_mut(credential)?;
        let age = entry.at.elapsed();
        if age < TTL || (entry.checking && age < 2 * TTL) {
            return Some(entry.visitor.clone());
        }
        entry.checking = true;
        None
    }

    /// What a request that checked meanwhile proved.
    fn known_fresh(&self, credential: &str) -> Option<Option<Visitor>> {
        let proved = self.proved.lock().expect("access cache");
        let entry = proved.get(credential)?;
        (entry.at.elapsed() < TTL).then(|| entry.visitor.clone())
    }

    /// What `credential` proved: kept, or checked (`check`) by one request.
    async fn resolve(
        &self,
        credential: &str,
        check: impl Future<Output = Result<Option<Visitor>, ApiError>>,
    ) -> Result<Option<Visitor>, ApiError> {
        if let Some(known) = self.known(credential) {
            return Ok(known);
        }
        // Never seen (or stale): the first request checks, those arriving
        // meanwhile wait for its answer (a burst of new connections sent each to
        // the store, one commit after another, and the slowest requests waited
        // a tenth of a second).
        let gate = self
            .first
            .lock()
            .expect("access cache")
            .entry(credential.to_owned())
            .or_default()
            .clone();
        let _turn = gate.lock().await;
        if let Some(known) = self.known_fresh(credential) {
            return Ok(known);
        }
        let checked = check.await;
        self.first.lock().expect("access cache").remove(credential);
        let mut proved = self.proved.lock().expect("access cache");
        let visitor = match checked {
            Ok(visitor) => visitor,
            Err(e) => {
                if let Some(entry) = proved.get_mut(credential) {
                    entry.checking = false;
                }
                return Err(e);
            }
        };
        if proved.len() >= MOST {
            proved.retain(|_, entry| entry.at.elapsed() < TTL);
        }
        let entry = Proved {
            visitor: visitor.clone(),
            at: Instant::now(),
            checking: false,
        };
        proved.insert(credential.to_owned(), entry);
        Ok(visitor)
    }
}

impl AccessCache {
    /// Forgets a cookie at once (its session was ended here).
    pub fn forget_cookie(&self, value: &str) {
        self.cookies
            .proved
            .lock()
            .expect("access cache")
            .remove(value);
    }
}

/// The visitor a request's credentials name: its bearer token if it has one,
/// else its session cookie; `None` when it has neither or they prove nothing.
pub async fn visitor(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<(Visitor, By)>, ApiError> {
    if let Some(token) = crate::auth::bearer_in(headers) {
        let found = state
            .proxy
            .access
            .bearers
            .resolve(token, async {
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
        .cookies
        .resolve(value, async {
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
