//! What a browser sees at the proxy when it does not reach a server: the server
//! starting (following its progress, then on to the server), stopped or failed
//! (with the reason and a way to start it again), not answering, or a visitor
//! without a session. API clients get the same as JSON `{error, message}`.

use std::sync::LazyLock;

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Response},
};
use base64::Engine as _;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use sha2::{Digest, Sha256};

/// Follows the progress stream named by `data-progress` and goes on to the server
/// once it is ready; on a failure or a lost stream, the page is asked again.
const FOLLOW: &str = r#"(() => {
  const root = document.getElementById('berth');
  const bar = document.getElementById('bar'), line = document.getElementById('line');
  const source = new EventSource(root.dataset.progress);
  source.onmessage = (e) => {
    const event = JSON.parse(e.data);
    bar.value = event.progress;
    line.textContent = event.message;
    if (event.ready || event.failed) {
      source.close();
      setTimeout(() => location.reload(), event.ready ? 0 : 1500);
    }
  };
  source.onerror = () => { source.close(); setTimeout(() => location.reload(), 3000); };
})();"#;

const STYLE: &str = "body{font:16px/1.5 system-ui,sans-serif;max-width:36em;margin:4em auto;\
padding:0 1em;color:#222}h1{font-size:1.4em}progress{width:100%}.muted{color:#666}\
.error{white-space:pre-wrap;background:#fbeaea;padding:.5em;border-radius:4px}\
button{font:inherit;padding:.3em 1em}";

/// Inline style and the one script, allowed by their hashes and nothing else.
static CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    let hash = |text: &str| base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text));
    HeaderValue::try_from(format!(
        "default-src 'none'; style-src 'sha256-{}'; script-src 'sha256-{}'; connect-src 'self'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        hash(STYLE),
        hash(FOLLOW)
    ))
    .expect("a header value")
});

fn page(status: StatusCode, title: &str, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Berth" }
                style { (PreEscaped(STYLE)) }
            }
            body { (body) }
        }
    };
    let mut response = (status, Html(markup.into_string())).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, CSP.clone());
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// The server is starting: progress, then on to it.
pub fn starting(server: &str, progress_url: &str) -> Response {
    let mut response = page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Starting",
        html! {
            main #berth data-progress=(progress_url) {
                h1 { (heading(server, "is starting")) }
                progress #bar max="100" value="0" {}
                p #line .muted { "waiting for it to start…" }
                p .muted { "This page goes on to the server once it is ready." }
            }
            script { (PreEscaped(FOLLOW)) }
        },
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    response
}

/// The server is stopped, failed or stopping: why, and a button to start it.
pub fn not_running(
    status: StatusCode,
    server: &str,
    state: &str,
    reason: Option<&str>,
    start_url: Option<&str>,
) -> Response {
    page(
        status,
        "Not running",
        html! {
            h1 { (heading(server, &format!("is {state}"))) }
            @if let Some(reason) = reason {
                p .error { (reason) }
            }
            @if let Some(action) = start_url {
                form method="post" action=(action) {
                    input type="hidden" name="server" value=(server);
                    button type="submit" { "Start it" }
                }
            } @else {
                p .muted { "Come back once it has stopped to start it again." }
            }
        },
    )
}

/// The server did not answer the proxy.
pub fn unreachable(server: &str) -> Response {
    page(
        StatusCode::BAD_GATEWAY,
        "Not answering",
        html! {
            h1 { (heading(server, "is not answering")) }
            p { "It is running, but it did not answer. It may be busy or may have stopped working; "
                "try again in a moment, or stop it and start it again." }
        },
    )
}

/// A page with a heading and one line: not found, forbidden, no session.
pub fn notice(status: StatusCode, title: &str, line: &str) -> Response {
    page(
        status,
        title,
        html! {
            h1 { (title) }
            p { (line) }
        },
    )
}

/// "Your server is …", or "Your server “lab” is …" for a named one.
fn heading(server: &str, rest: &str) -> String {
    if server.is_empty() {
        format!("Your server {rest}")
    } else {
        format!("Your server “{server}” {rest}")
    }
}
