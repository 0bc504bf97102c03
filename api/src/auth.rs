//! Who is calling: a logged-in user (JWT), a service token with scopes, a server's
//! own token, or the break-glass admin token. And what each may do.

use std::net::{IpAddr, SocketAddr};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::{HeaderMap, header, header::AUTHORIZATION, request::Parts},
};
use schema::{ServerName, ServerRow, UserName, UserRow, prelude::*};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{
    AppState,
    error::ApiError,
    tokens::{TokenError, hash_opaque},
};

pub const SERVICE_TOKEN_PREFIX: &str = "bt_";
pub const SERVER_TOKEN_PREFIX: &str = "bs_";

/// Scopes a service token may carry; `admin` implies every other but
/// `servers:access` (reaching users' servers through the proxy), which is given
/// by name only.
pub const SCOPES: [&str; 6] = [
    "servers:read",
    "servers:write",
    "servers:access",
    "users:read",
    "users:write",
    "admin",
];

#[derive(Debug, Clone)]
pub enum Principal {
    User {
        user: UserRow,
        jti: Uuid,
    },
    Service {
        name: String,
        scopes: Vec<String>,
    },
    /// A user server authenticating with its own token.
    Server {
        server: Box<ServerRow>,
    },
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.has_scope("admin")
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        match self {
            Principal::User { user, .. } => user.is_admin(),
            Principal::Service { scopes, .. } => scopes.iter().any(|s| s == scope || s == "admin"),
            Principal::Server { .. } => false,
        }
    }

    fn is_user(&self, name: &UserName) -> bool {
        matches!(self, Principal::User { user, .. } if user.name == name.as_str())
    }

    /// Users act on themselves; others need `scope`.
    pub fn may(&self, scope: &str, on: &UserName) -> Result<(), ApiError> {
        if self.is_user(on) || self.has_scope(scope) {
            return Ok(());
        }
        Err(ApiError::Forbidden(match self {
            Principal::User { .. } => {
                format!("you may only act on your own account and servers, not {on:?}'s")
            }
            _ => format!("this token lacks the {scope} scope"),
        }))
    }

    /// Activity of one server: its user (or `servers:write`), or the server itself
    /// with its own token, about itself and nothing else.
    pub fn may_report(&self, user: &UserName, server: &ServerName) -> Result<(), ApiError> {
        match self {
            Principal::Server { server: own }
                if own.user_name == user.as_str() && own.name == server.as_str() =>
            {
                Ok(())
            }
            Principal::Server { .. } => Err(ApiError::Forbidden(
                "a server's token reports its own server's activity only".into(),
            )),
            _ => self.may("servers:write", user),
        }
    }

    pub fn require(&self, scope: &str) -> Result<(), ApiError> {
        if self.has_scope(scope) {
            return Ok(());
        }
        Err(ApiError::Forbidden(match self {
            Principal::User { .. } if scope == "admin" => "this needs an admin".into(),
            Principal::User { .. } => {
                format!("this needs an admin or a token with the {scope} scope")
            }
            _ => format!("this token lacks the {scope} scope"),
        }))
    }

    /// How the audit log names the caller.
    pub fn actor(&self) -> String {
        match self {
            Principal::User { user, .. } => format!("user:{}", user.name),
            Principal::Service { name, .. } => format!("token:{name}"),
            Principal::Server { server } => format!("server:{}/{}", server.user_name, server.name),
        }
    }
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    if parts
        .headers
        .get(AUTHORIZATION)
        .is_some_and(|v| v.to_str().is_err())
    {
        return Err(ApiError::Unauthorized(
            "the Authorization header is not text".into(),
        ));
    }
    bearer_in(&parts.headers)
        .ok_or_else(|| ApiError::Unauthorized("send Authorization: Bearer <token>".into()))
}

/// Whether a browser's request comes from Berth's own pages: its `Origin`, when
/// it sends one, is the configured public origin (`BERTH_PUBLIC_URL`), scheme and
/// port included, or without one `http://` and the request's own `Host`; and its
/// `Sec-Fetch-Site`, when sent, is `same-origin` (or `none`: typed by the user).
/// Comparing with the `Host` alone let `https://evil` match `http://evil`'s host.
pub fn from_own_pages(state: &AppState, headers: &axum::http::HeaderMap) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site")
        && site != "same-origin"
        && site != "none"
    {
        return false;
    }
    let Some(origin) = text("origin") else {
        // No Origin: not a browser's cross-site request.
        return true;
    };
    if state.config.has_public_url() {
        return origin.eq_ignore_ascii_case(&state.origin);
    }
    text("host").is_some_and(|host| origin.eq_ignore_ascii_case(&format!("http://{host}")))
}

/// The token of an `Authorization: Bearer <token>` header, if there is one.
pub fn bearer_in(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        Principal::from_token(state, token).await
    }
}

impl Principal {
    /// Who a bearer token (or the dashboard's session cookie) belongs to.
    pub async fn from_token(state: &AppState, token: &str) -> Result<Self, ApiError> {
        if let Some(admin) = &state.config.admin_token
            && same_secret(token, admin)
        {
            return Ok(Principal::Service {
                name: "bootstrap".into(),
                scopes: vec!["admin".into()],
            });
        }
        if token.starts_with(SERVICE_TOKEN_PREFIX) {
            let row = state.db.use_api_token(&hash_opaque(token)).await?;
            return row
                .map(|t| Principal::Service {
                    name: t.name,
                    scopes: t.scopes,
                })
                .ok_or_else(|| {
                    ApiError::Unauthorized(
                        "the token is not valid, has expired or was revoked".into(),
                    )
                });
        }
        if token.starts_with(SERVER_TOKEN_PREFIX) {
            let server = state.db.server_by_token(&hash_opaque(token)).await?;
            return server
                .map(|server| Principal::Server {
                    server: Box::new(server),
                })
                .ok_or_else(|| ApiError::Unauthorized("the server token is not valid".into()));
        }
        let claims = state.keys.verify(token).map_err(|e| match e {
            TokenError::Expired => {
                ApiError::Unauthorized("the token has expired; log in again".into())
            }
            TokenError::Invalid => ApiError::Unauthorized("the token is not valid".into()),
        })?;
        let user = state
            .db
            .session_user(claims.jti)
            .await?
            .filter(|u| u.name == claims.sub)
            .ok_or_else(|| {
                ApiError::Unauthorized("the token has been revoked; log in again".into())
            })?;
        Ok(Principal::User {
            user,
            jti: claims.jti,
        })
    }
}

/// The networks whose connections may say who the client is (`X-Forwarded-For`):
/// proxies and load balancers in front of Berth (`BERTH_TRUSTED_PROXIES`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// Parses CIDRs (`10.0.0.0/8`, `::1/128`); a bare address is one host.
    pub fn parse(list: &[String]) -> Result<Self, String> {
        let mut networks = vec![];
        for entry in list.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let (address, bits) = entry.split_once('/').unwrap_or((entry, ""));
            let address: IpAddr = address
                .parse()
                .map_err(|_| format!("{entry:?} is not an IP network such as 10.0.0.0/8"))?;
            let most = if address.is_ipv4() { 32 } else { 128 };
            let bits = if bits.is_empty() {
                most
            } else {
                bits.parse()
                    .ok()
                    .filter(|b| *b <= most)
                    .ok_or_else(|| format!("{entry:?}: the prefix length must be 0 to {most}"))?
            };
            networks.push((address, bits));
        }
        Ok(Self(networks))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|(network, bits)| match (network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                prefix(u32::from(*n).into(), u32::from(a).into(), *bits, 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix(u128::from(*n), u128::from(a), *bits, 128),
            _ => false,
        })
    }

    /// Who the client is: the peer, unless the peer is a trusted proxy; then the
    /// rightmost `X-Forwarded-For` hop that is not one (hops left of it were written
    /// by whoever sent the request, and prove nothing). A hop that is not an IP
    /// address ends the walk: the last trusted hop is the answer.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) if self.contains(ip) => client = ip,
                Ok(ip) => return ip,
                Err(_) => break,
            }
        }
        client
    }
}

/// Whether `a` is in the network `n` of `bits` leading bits (of `width`).
fn prefix(n: u128, a: u128, bits: u8, width: u8) -> bool {
    let shift = u32::from(width - bits);
    bits == 0 || (n >> shift) == (a >> shift)
}

/// The caller's address: the peer, or who a trusted proxy in front says the
/// client is (see [`TrustedProxies::client`]).
#[derive(Debug, Clone)]
pub struct ClientAddr(pub Option<String>);

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        Ok(ClientAddr(peer.map(|peer| {
            state.trusted.client(peer, &parts.headers).to_string()
        })))
    }
}

/// Compares digests, so the time taken says nothing about where the strings differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// A cookie's value, from any `Cookie` header.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_hops(hops: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", hops.parse().unwrap());
        headers
    }

    #[test]
    fn the_client_is_the_rightmost_hop_no_trusted_proxy_added() {
        let trusted = TrustedProxies::parse(&["10.0.0.0/8".into(), "::1".into()]).unwrap();
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        // From a client straight: its header proves nothing.
        assert_eq!(trusted.client(stranger, &with_hops("1.2.3.4")), stranger);
        // Through the proxy: the hop it added, not what the client wrote before it.
        let spoofed = with_hops("6.6.6.6, 198.51.100.7, 10.9.9.9");
        assert_eq!(
            trusted.client(proxy, &spoofed),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        // Markup instead of an address: the proxy itself.
        assert_eq!(trusted.client(proxy, &with_hops("<b>x</b>")), proxy);
        assert_eq!(trusted.client(proxy, &HeaderMap::new()), proxy);
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TrustedProxies::parse(&["ten".into()]).is_err());
        assert!(trusted.contains("::1".parse().unwrap()));
        assert!(!trusted.contains("11.0.0.1".parse().unwrap()));
    }
}
