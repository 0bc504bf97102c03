//! Forwarding one request to a server: HTTP/1.1 over a pool of kept-alive
//! connections, bodies streamed both ways (never buffered whole), the path kept
//! as it came, hop-by-hop headers dropped, Berth's own credentials removed and
//! the server's secret added, `X-Forwarded-*` set. A WebSocket upgrade gets a
//! connection of its own, spliced to the client's once both sides switched.

use std::{net::IpAddr, time::Duration};

use axum::{
    body::{Body, Bytes},
    http::{
        HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header,
        uri::{Authority, PathAndQuery, Scheme},
    },
};
use hyper_util::{
    client::legacy::{Client as Pool, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use tokio::net::TcpStream;

use super::websocket;

pub type Client = Pool<HttpConnector, Body>;

/// The pool every request to a server goes through.
pub fn client(connect_timeout: Duration) -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    Pool::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build(connector)
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the server's address {0:?} is not usable")]
    Address(String),
    #[error("the server did not answer: {0}")]
    Unreachable(String),
    #[error("the server did not begin its answer within {0:?}")]
    Timeout(Duration),
}

/// Where and how to reach one server.
pub struct Upstream<'a> {
    /// Its internal address, `http://host:port/`.
    pub url: &'a str,
    /// The secret it accepts from the proxy.
    pub token: &'a str,
}

/// What the proxy tells a server about the client.
pub struct Caller<'a> {
    pub ip: Option<IpAddr>,
    /// Whether `X-Forwarded-*` already on the request are to be believed (a
    /// trusted proxy in front, `BERTH_TRUST_FORWARDED_FOR`).
    pub trust_forwarded: bool,
    /// `http` or `https`: how users reach Berth.
    pub scheme: &'a str,
}

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Cookies of Berth's that a server never sees.
const OWN_COOKIES: [&str; 2] = [super::access::COOKIE, "berth_session"];

/// Removes the hop-by-hop headers, and those the `Connection` header names.
fn drop_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// The request as the server is to see it.
fn prepare(
    request: &mut Request<Body>,
    upstream: &Upstream<'_>,
    client: &Caller<'_>,
    upgrade: Option<HeaderValue>,
) -> Result<(), ForwardError> {
    let bad = || ForwardError::Address(upstream.url.to_owned());
    let base: Uri = upstream.url.parse().map_err(|_| bad())?;
    let authority: Authority = base.authority().cloned().ok_or_else(bad)?;
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|_| bad())?;
    let host = request.headers().get(header::HOST).cloned();
    let headers = request.headers_mut();
    drop_hop_by_hop(headers);
    headers.remove(header::AUTHORIZATION);
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::try_from(format!("token {}", upstream.token)).map_err(|_| bad())?,
    );
    let cookies: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
            !pair.is_empty() && !OWN_COOKIES.contains(&name)
        })
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if !cookies.is_empty()
        && let Ok(value) = HeaderValue::try_from(cookies.join("; "))
    {
        headers.insert(header::COOKIE, value);
    }
    forwarded(headers, client, host);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
    Ok(())
}

/// `X-Forwarded-For`, `-Proto` and `-Host`: appended to or kept from a trusted
/// proxy's, else set from this connection.
fn forwarded(headers: &mut HeaderMap, client: &Caller<'_>, host: Option<HeaderValue>) {
    const FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    const PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
    let ip = client.ip.map(|ip| ip.to_string());
    let earlier = headers
        .get(&FOR)
        .and_then(|v| v.to_str().ok())
        .filter(|_| client.trust_forwarded)
        .map(str::to_owned);
    let chain = match (earlier, ip) {
        (Some(earlier), Some(ip)) => Some(format!("{earlier}, {ip}")),
        (earlier, ip) => earlier.or(ip),
    };
    headers.remove(&FOR);
    if let Some(value) = chain.and_then(|c| HeaderValue::try_from(c).ok()) {
        headers.insert(FOR, value);
    }
    if !(client.trust_forwarded && headers.contains_key(&PROTO)) {
        headers.insert(
            PROTO,
            HeaderValue::from_str(client.scheme).expect("a scheme"),
        );
    }
    if !(client.trust_forwarded && headers.contains_key(&HOST)) {
        headers.remove(&HOST);
        if let Some(host) = host {
            headers.insert(HOST, host);
        }
    }
}

/// Forwards an HTTP request and streams the server's answer back.
pub async fn http(
    pool: &Client,
    mut request: Request<Body>,
    upstream: &Upstream<'_>,
    client: &Caller<'_>,
    timeout: Duration,
) -> Result<Response<Body>, ForwardError> {
    prepare(&mut request, upstream, client, None)?;
    let mut response = tokio::time::timeout(timeout, pool.request(request))
        .await
        .map_err(|_| ForwardError::Timeout(timeout))?
        .map_err(|e| ForwardError::Unreachable(error_chain(&e)))?;
    drop_hop_by_hop(response.headers_mut());
    Ok(response.map(Body::new))
}

/// The protocol a request asks to switch to, when it asks.
pub fn upgrade_of(request: &Request<Body>) -> Option<HeaderValue> {
    let asks = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| request.headers().get(header::UPGRADE).cloned())
        .flatten()
}

/// Forwards a WebSocket handshake on a connection of its own; once the server
/// switched protocols, both connections are spliced in a task of their own and
/// `message` is called for each client message. The server's answer is returned
/// to the client (101, or whatever it refused with).
pub async fn websocket(
    mut request: Request<Body>,
    upstream: &Upstream<'_>,
    client: &Caller<'_>,
    protocol: HeaderValue,
    connect_timeout: Duration,
    message: impl Fn() + Send + Sync + 'static,
) -> Result<Response<Body>, ForwardError> {
    let from_client = hyper::upgrade::on(&mut request);
    prepare(&mut request, upstream, client, Some(protocol))?;
    let authority = request
        .uri()
        .authority()
        .map(|a| a.to_string())
        .ok_or_else(|| ForwardError::Address(upstream.url.to_owned()))?;
    // The origin-form target, as a server expects it on its own connection.
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(path);
    let unreachable = |e: &dyn std::fmt::Display| ForwardError::Unreachable(e.to_string());
    let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(&authority))
        .await
        .map_err(|_| {
            ForwardError::Unreachable(format!("no connection within {connect_timeout:?}"))
        })?
        .map_err(|e| unreachable(&e))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(&e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "WebSocket handshake connection ended");
        }
    });
    let mut response = sender
        .send_request(request)
        .await
        .map_err(|e| unreachable(&e))?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let from_server = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            let (client, server) = match tokio::join!(from_client, from_server) {
                (Ok(c), Ok(s)) => (c, s),
                (c, s) => {
                    tracing::debug!(client = ?c.err(), server = ?s.err(), "a side did not switch");
                    return;
                }
            };
            match (tcp(client), tcp(server)) {
                (Some((c, cb)), Some((s, sb))) => websocket::splice(c, cb, s, sb, message).await,
                _ => tracing::warn!("an upgraded connection was not a TCP stream"),
            }
        });
    }
    let mut response = response.map(Body::new);
    let keep_upgrade = response.headers().get(header::UPGRADE).cloned();
    drop_hop_by_hop(response.headers_mut());
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(protocol) = keep_upgrade {
            response.headers_mut().insert(header::UPGRADE, protocol);
        }
    }
    Ok(response)
}

/// The TCP stream under an upgraded connection, and what was read past the
/// handshake on it.
fn tcp(upgraded: hyper::upgrade::Upgraded) -> Option<(TcpStream, Bytes)> {
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
    Some((parts.io.into_inner(), parts.read_buf))
}

/// An error with its causes, for the log and the 502 page.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
