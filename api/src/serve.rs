//! Serving a router over HTTP/1.1, for the API and the proxy alike. Written on
//! hyper's own connection builder rather than `axum::serve` so that a connection
//! upgraded to a WebSocket hands the proxy back the plain TCP stream (idle
//! WebSockets then hold no buffers, see `proxy::websocket`), and so that each
//! connection carries its own connections to servers (`proxy::forward::Upstreams`).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, body::Body, extract::ConnectInfo};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::Service;

use crate::AppState;

/// How long a shutdown waits for requests in flight (WebSockets and streams are
/// not waited for: they end with the process).
const DRAIN: Duration = Duration::from_secs(10);

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more wait to be accepted (the kernel's backlog).
    pub connections: usize,
    /// How long a client may take to send a request's headers, and how long a
    /// kept-alive connection may stay idle before the next request begins.
    pub header_timeout: Duration,
    /// Answer only requests whose `Host` names this machine's loopback (a Berth
    /// on 127.0.0.1 without a public URL): a web page whose name was rebound to
    /// 127.0.0.1 reaches the listener with its own name as `Host`, and is refused.
    pub loopback_hosts_only: bool,
}

/// Connections the kernel holds for a listener until they are accepted (capped
/// at `net.core.somaxconn`, 4096 by default). Tokio's `bind` asks for 128: a
/// storm of 1,000 users connecting at once overflowed it, and each dropped
/// connection waited a second for its SYN to be sent again (`ops/bench/src/up.rs`).
const BACKLOG: u32 = 4096;

/// A listener on `address` with room for a storm's connections (`BACKLOG`).
pub fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(BACKLOG)
}

/// Whether `host` (a `Host` header: name or address, maybe a port) names the
/// loopback: `localhost`, an address in 127.0.0.0/8, or `[::1]`.
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(rest, |(inside, _)| inside),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Serves `app` on `listener` until `shutdown` fires, then lets requests in
/// flight finish (for at most `DRAIN`). Each request carries `ConnectInfo` with
/// the peer's address. With `proxy`, the proxy's requests go to it directly:
/// the hot path skips the router.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    proxy: Option<Arc<AppState>>,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    let places = Arc::new(tokio::sync::Semaphore::new(limits.connections.max(1)));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        // A connection is accepted once there is room for it: a flood of slow
        // clients waits in the backlog instead of taking every descriptor.
        let place = tokio::select! {
            place = places.clone().acquire_owned() => place.expect("never closed"),
            _ = shutdown.cancelled() => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors and the like: wait a moment, keep serving.
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        // The proxy's connections to servers for this client connection.
        let upstreams = std::sync::Arc::new(crate::proxy::forward::Upstreams::default());
        let proxy = proxy.clone();
        let service = service_fn(move |mut request: hyper::Request<Incoming>| {
            let extensions = request.extensions_mut();
            extensions.insert(ConnectInfo::<SocketAddr>(peer));
            extensions.insert(upstreams.clone());
            let request = request.map(Body::new);
            let proxy = proxy
                .clone()
                .filter(|_| crate::proxy::claims(request.uri().path()));
            let mut app = app.clone();
            let foreign = limits.loopback_hosts_only
                && request
                    .headers()
                    .get(hyper::header::HOST)
                    .is_some_and(|h| !h.to_str().is_ok_and(is_loopback_host));
            async move {
                if foreign {
                    return Ok(axum::response::IntoResponse::into_response(
                        crate::error::ApiError::Forbidden(
                            "this Berth listens on the loopback and answers only to \
                             localhost or 127.0.0.1; the Host header named another site \
                             (set BERTH_PUBLIC_URL to serve under a name)"
                                .into(),
                        ),
                    ));
                }
                let response = match proxy {
                    Some(state) => crate::proxy::answer(&state, request).await,
                    None => app
                        .call(request)
                        .await
                        .unwrap_or_else(|never| match never {}),
                };
                Ok::<_, Infallible>(response)
            }
        });
        let connection = builder
            .serve_connection(TokioIo::new(tcp), service)
            .with_upgrades();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _place = place;
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = shutdown.cancelled() => {
                    // Ends after the request in flight; an idle one at once.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(DRAIN, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("requests still open after {DRAIN:?}; closing them");
    }
    Ok(())
}
