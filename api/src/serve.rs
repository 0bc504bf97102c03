//! Serving a router over HTTP/1.1, for the API and the proxy alike. Written on
//! hyper's own connection builder rather than `axum::serve` so that a connection
//! upgraded to a WebSocket hands the proxy back the plain TCP stream (idle
//! WebSockets then hold no buffers, see `proxy::websocket`), and so that each
//! connection carries its own connections to servers (`proxy::forward::Upstreams`).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, body::Body, extract::ConnectInfo};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::Service;

use crate::AppState;

/// How long a shutdown waits for requests in flight (WebSockets and streams are
/// not waited for: they end with the process).
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` fires, then lets requests in
/// flight finish (for at most `DRAIN`). Each request carries `ConnectInfo` with
/// the peer's address. With `proxy`, the proxy's requests go to it directly:
/// the hot path skips the router.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    proxy: Option<Arc<AppState>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    loop {
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
            async move {
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
        let connection = http1::Builder::new()
            .serve_connection(TokioIo::new(tcp), service)
            .with_upgrades();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
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
