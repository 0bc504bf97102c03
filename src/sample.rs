//! `berth sample-server`: a small server of the user's working directory, the
//! default `BERTH_SERVER_COMMAND`, so that `berth up` on a bare machine starts
//! servers a browser can open. Like any server behind Berth's proxy it serves
//! under its prefix (`BERTH_BASE_URL`) and answers only requests that carry the
//! proxy's token (`BERTH_PROXY_TOKEN`). GET lists a directory or sends a file,
//! PUT stores one (streamed to disk).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Component, Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, Method, StatusCode, header},
    response::{Html, IntoResponse, Response},
};
use futures::TryStreamExt;
use tokio::io::AsyncWriteExt;

struct Sample {
    base: String,
    token: Option<String>,
    user: String,
    root: PathBuf,
}

pub async fn run() -> anyhow::Result<()> {
    let port: u16 = std::env::var("BERTH_SERVER_PORT")
        .context("BERTH_SERVER_PORT is not set: Berth sets it for the servers it starts")?
        .parse()
        .context("BERTH_SERVER_PORT")?;
    let mut base = std::env::var("BERTH_BASE_URL").unwrap_or_else(|_| "/".into());
    if !base.ends_with('/') {
        base.push('/');
    }
    let sample = Arc::new(Sample {
        base,
        token: std::env::var("BERTH_PROXY_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
        user: std::env::var("BERTH_USER").unwrap_or_default(),
        root: std::env::current_dir()?,
    });
    let listener =
        tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    eprintln!(
        "sample server of {} on port {port} under {}",
        sample.root.display(),
        sample.base
    );
    let app = Router::new().fallback(serve).with_state(sample);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn serve(State(sample): State<Arc<Sample>>, request: Request) -> Response {
    if let Some(token) = &sample.token
        && !carries(request.headers(), token)
    {
        return (StatusCode::FORBIDDEN, "this server answers its proxy only").into_response();
    }
    let path = request.uri().path().to_owned();
    let Some(rest) = path.strip_prefix(&sample.base) else {
        return (
            StatusCode::NOT_FOUND,
            format!("this server lives under {}", sample.base),
        )
            .into_response();
    };
    let Some(file) = inside(&sample.root, rest) else {
        return (StatusCode::BAD_REQUEST, "no such path").into_response();
    };
    match *request.method() {
        Method::GET | Method::HEAD => show(&sample, &path, &file).await,
        Method::PUT => store(&file, request.into_body()).await,
        _ => (StatusCode::METHOD_NOT_ALLOWED, "GET, HEAD or PUT").into_response(),
    }
}

fn carries(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("token "))
        .is_some_and(|given| api::auth::same_secret(given, token))
}

/// The file `rest` names under `root`; `None` when it would leave it.
fn inside(root: &Path, rest: &str) -> Option<PathBuf> {
    let rest = Path::new(rest.trim_start_matches('/'));
    rest.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| root.join(rest))
}

async fn show(sample: &Sample, path: &str, file: &Path) -> Response {
    let Ok(meta) = tokio::fs::metadata(file).await else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    if !meta.is_dir() {
        return match tokio::fs::read(file).await {
            Ok(bytes) => bytes.into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        };
    }
    let mut names = vec![];
    if let Ok(mut entries) = tokio::fs::read_dir(file).await {
        while let Ok(Some(entry)) = entries.next_entry().await {
            let dir = entry.file_type().await.is_ok_and(|t| t.is_dir());
            let name = entry.file_name().to_string_lossy().into_owned();
            names.push(if dir { format!("{name}/") } else { name });
        }
    }
    names.sort();
    let page = maud::html! {
        (maud::DOCTYPE)
        html {
            head { meta charset="utf-8"; title { "Berth sample server" } }
            body {
                h1 { "Hello " (sample.user) }
                p { "This is Berth's sample server, serving your working directory. "
                    "Set BERTH_IMAGE (or BERTH_SERVER_COMMAND) to give users a real one, such as Jupyter." }
                h2 { (path) }
                ul { @for name in &names { li { a href=(name) { (name) } } } }
            }
        }
    };
    Html(page.into_string()).into_response()
}

async fn store(file: &Path, body: Body) -> Response {
    let written = async {
        if let Some(parent) = file.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let mut out = tokio::fs::File::create(file).await?;
        let mut chunks = body.into_data_stream().map_err(std::io::Error::other);
        let mut size = 0u64;
        while let Some(chunk) = chunks.try_next().await? {
            size += chunk.len() as u64;
            out.write_all(&chunk).await?;
        }
        out.flush().await?;
        Ok::<_, std::io::Error>(size)
    };
    match written.await {
        Ok(size) => (StatusCode::CREATED, format!("stored {size} bytes\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
