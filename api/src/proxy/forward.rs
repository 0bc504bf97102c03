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
        uri::PathAndQuery,
    },
};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::websocket;

/// The connections to servers that one client connection uses, for as long as it
/// lives. Requests on an HTTP/1.1 connection come one after another, so one
/// connection per server suffices, and a request goes out on the way its client
/// came in: no pool shared across connections, no lock held by two requests. On a
/// 2-core machine this forwarded a fifth more requests per second than a shared
/// pool (hyper-util's), the same as nginx's upstream keep-alive.
#[derive(Default)]
pub struct Upstreams {
    idle: std::sync::Mutex<Vec<(String, SendRequest<Body>)>>,
}

/// Idle connections one client connection keeps (to that many servers).
const KEPT: usize = 4;

impl Upstreams {
    fn take(&self, authority: &str) -> Option<(String, SendRequest<Body>)> {
        let mut idle = self.idle.lock().expect("upstreams");
        let at = idle.iter().position(|(a, _)| a == authority)?;
        Some(idle.swap_remove(at))
    }

    fn keep(&self, authority: String, sender: SendRequest<Body>) {
        let mut idle = self.idle.lock().expect("upstreams");
        if idle.len() < KEPT {
            idle.push((authority, sender));
        }
    }
}

/// A new connection to a server, its driver running in a task of its own.
async fn connect(
    authority: &str,
    timeout: Duration,
    upgrades: bool,
) -> Result<SendRequest<Body>, ForwardError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(authority))
        .await
        .map_err(|_| ForwardError::Unreachable(format!("no connection within {timeout:?}")))?
        .map_err(|e| ForwardError::Unreachable(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ForwardError::Unreachable(error_chain(&e)))?;
    tokio::spawn(async move {
        let ended = if upgrades {
            connection.with_upgrades().await
        } else {
            connection.await
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "a connection to a server ended");
        }
    });
    Ok(sender)
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
    /// The address the connection came from.
    pub peer: Option<IpAddr>,
    /// Whether `X-Forwarded-*` already on the request are to be believed (the
    /// peer is a proxy in front of Berth, `BERTH_TRUSTED_PROXIES`).
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

/// The request as the server is to see it (the target in origin form, as on a
/// connection of its own); the server's `host:port`.
fn prepare<'a>(
    request: &mut Request<Body>,
    upstream: &Upstream<'a>,
    client: &Caller<'_>,
    upgrade: Option<HeaderValue>,
) -> Result<&'a str, ForwardError> {
    let bad = || ForwardError::Address(upstream.url.to_owned());
    let authority = upstream
        .url
        .strip_prefix("http://")
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(bad)?;
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(path);
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
    Ok(authority)
}

/// `X-Forwarded-For`, `-Proto` and `-Host`: appended to or kept from a trusted
/// proxy's, else set from this connection.
fn forwarded(headers: &mut HeaderMap, client: &Caller<'_>, host: Option<HeaderValue>) {
    const FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    const PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
    let ip = client.peer.map(|ip| ip.to_string());
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

/// Forwards an HTTP request on the client connection's own connection to the
/// server (a new one when it has none, or its last one was closed meanwhile) and
/// streams the server's answer back.
pub async fn http(
    upstreams: &Upstreams,
    mut request: Request<Body>,
    upstream: &Upstream<'_>,
    client: &Caller<'_>,
    timeouts: (Duration, Duration),
) -> Result<Response<Body>, ForwardError> {
    let (connect_timeout, answer_timeout) = timeouts;
    let authority = prepare(&mut request, upstream, client, None)?;
    let answer = async {
        // A kept connection the server closed while idle hands the request back
        // unsent: it goes out once more on a new one.
        if let Some((name, mut kept)) = upstreams.take(authority)
            && kept.ready().await.is_ok()
        {
            match kept.try_send_request(request).await {
                Ok(response) => return Ok((name, kept, response)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(ForwardError::Unreachable(error_chain(e.error()))),
                },
            }
        }
        let mut fresh = connect(authority, connect_timeout, false).await?;
        let response = fresh
            .send_request(request)
            .await
            .map_err(|e| ForwardError::Unreachable(error_chain(&e)))?;
        Ok((authority.to_owned(), fresh, response))
    };
    let (name, sender, mut response) = tokio::time::timeout(answer_timeout, answer)
        .await
        .map_err(|_| ForwardError::Timeout(answer_timeout))??;
    upstreams.keep(name, sender);
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
    let authority = prepare(&mut request, upstream, client, Some(protocol))?;
    let mut sender = connect(authority, connect_timeout, true).await?;
    let mut response = sender
        .send_request(request)
        .await
        .map_err(|e| ForwardError::Unreachable(error_chain(&e)))?;
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
    // Copied out, so that hyper's whole read buffer is not kept with it.
    let early = Bytes::copy_from_slice(&parts.read_buf);
    Some((parts.io.into_inner(), early))
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
