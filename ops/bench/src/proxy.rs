//! The proxy against the same backend reached straight and through Debian's nginx,
//! in one run: requests per second and latency at 50 connections (wrk), a
//! WebSocket echo's round trip, and the proxy's memory with 5,000 idle WebSockets.
//!
//!     cargo build --release -p berth -p bench
//!     ./target/release/proxy     # --connections 50 --seconds 10 --idle 5000
//!
//! Needs Postgres (BERTH_BENCH_DATABASE_URL, a superuser URL), `nginx` and `wrk`
//! (Debian's packages), and an open-file limit above 2 × the idle WebSockets. It runs
//! `berth up` on a fresh database with local-process servers whose command is this
//! program's `backend` (a small HTTP and WebSocket-echo server), starts one server
//! through the API, then measures the same backend three ways: straight, through
//! nginx configured as a plain reverse proxy (keep-alive to the backend, WebSocket
//! upgrades), and through a separate `berth proxy` process.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

// Shared with the storm benchmarks, whose burst helpers this one does not use.
#[allow(dead_code)]
mod measure;
use measure::{Processes, free_port, percentile, rss_kib, wait_answers, wrk};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    backend: Option<Backend>,
    /// wrk connections.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Seconds of each wrk run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Idle WebSockets held open for the memory figure.
    #[arg(long, default_value_t = 5000)]
    idle: usize,
    /// Echo round trips timed per target.
    #[arg(long, default_value_t = 2000)]
    echoes: usize,
    #[arg(long, default_value = "target/release/berth")]
    berth: String,
    #[arg(
        long,
        env = "BERTH_BENCH_DATABASE_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
}

#[derive(Subcommand)]
enum Backend {
    /// The benchmark's backend (started by Berth as a user's server): `GET` answers
    /// a short text, a WebSocket upgrade echoes every message.
    Backend {
        #[arg(long, env = "BERTH_SERVER_PORT")]
        port: u16,
    },
}

const TOKEN: &str = "bench-admin-token-0123456789";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Backend::Backend { port }) = args.backend {
        return backend(port).await;
    }
    let mut processes = Processes(vec![]);
    let db = measure::BenchDatabase::create(&args.database_url, "berth_bench_proxy").await?;
    let result = run(&args, &db.url, &mut processes).await;
    drop(processes);
    db.remove().await;
    result
}

async fn run(args: &Args, url: &str, processes: &mut Processes) -> anyhow::Result<()> {
    let data = std::env::temp_dir().join(format!("berth-bench-proxy-{}", std::process::id()));
    let me = std::env::current_exe()?;
    let key = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519"])
        .output()
        .context("openssl makes a signing key")?
        .stdout;
    let key = String::from_utf8(key)?;
    let (api_port, proxy_port, nginx_port) = (free_port(), free_port(), free_port());
    let common = |cmd: &mut Command| {
        cmd.env("BERTH_DATABASE_URL", url)
            .env("BERTH_JWT_PRIVATE_KEY", &key)
            .env("BERTH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
    };
    let mut up = Command::new(&args.berth);
    up.arg("up")
        .env("BERTH_LISTEN", format!("127.0.0.1:{api_port}"))
        .env("BERTH_ADMIN_TOKEN", TOKEN)
        .env("BERTH_SPAWNER", "process")
        .env("BERTH_DATA_DIR", &data)
        .env("BERTH_HOMES_DIR", data.with_extension("homes"))
        .env(
            "BERTH_SERVER_COMMAND",
            format!("'{}' backend --port {{port}}", me.display()),
        );
    common(&mut up);
    processes.0.push(up.spawn().context("berth up")?);
    let api = format!("http://127.0.0.1:{api_port}/api/v1");
    let http = reqwest::Client::new();
    wait_answers(&http, &format!("http://127.0.0.1:{api_port}/ready")).await?;

    // One user, one server (the backend), and a token that reaches it.
    http.post(format!("{api}/users/bench"))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    http.post(format!("{api}/users/bench/server"))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    let mut internal = None;
    for _ in 0..200 {
        let server: serde_json::Value = http
            .get(format!("{api}/users/bench/server"))
            .bearer_auth(TOKEN)
            .send()
            .await?
            .json()
            .await?;
        if server["state"] == "running" {
            internal = server["internal_url"].as_str().map(str::to_owned);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let internal = internal.context("the backend server did not start")?;
    let backend: SocketAddr = internal
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()?;
    let created: serde_json::Value = http
        .post(format!("{api}/admin/tokens"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"name": "bench", "scopes": ["servers:access"]}))
        .send()
        .await?
        .json()
        .await?;
    let access = created["token"]
        .as_str()
        .context("a servers:access token")?
        .to_owned();

    // The proxy under test: a process of its own, so its memory is its own.
    let mut proxy = Command::new(&args.berth);
    proxy
        .arg("proxy")
        .env("BERTH_LISTEN", format!("127.0.0.1:{proxy_port}"));
    common(&mut proxy);
    processes.0.push(proxy.spawn().context("berth proxy")?);
    let proxy_pid = processes.0.last().unwrap().id();
    wait_answers(&http, &format!("http://127.0.0.1:{proxy_port}/ready")).await?;

    let nginx_dir = data.join("nginx");
    std::fs::create_dir_all(&nginx_dir)?;
    std::fs::write(
        nginx_dir.join("nginx.conf"),
        nginx_conf(&nginx_dir, nginx_port, backend, args.idle),
    )?;
    processes.0.push(
        Command::new("nginx")
            .args(["-p", &nginx_dir.to_string_lossy(), "-c", "nginx.conf"])
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("nginx (Debian's nginx package)")?,
    );
    let nginx_pid = processes.0.last().unwrap().id();
    wait_answers(&http, &format!("http://127.0.0.1:{nginx_port}/user/bench/")).await?;

    let path = "/user/bench/hello";
    let auth = format!("Authorization: Bearer {access}");
    let targets = [
        ("straight", format!("http://{backend}{path}"), None),
        (
            "nginx",
            format!("http://127.0.0.1:{nginx_port}{path}"),
            None,
        ),
        (
            "berth proxy",
            format!("http://127.0.0.1:{proxy_port}{path}"),
            Some(auth.as_str()),
        ),
    ];
    println!(
        "HTTP: wrk, 2 threads, {} connections, {} s each after 2 s of warm-up (a GET of a 13-byte answer)",
        args.connections, args.seconds
    );
    let mut rates = vec![];
    for (name, target, header) in &targets {
        let extra: Vec<&str> = header.iter().flat_map(|h| ["-H", *h]).collect();
        // Warm: connection pools open (Postgres logins cost milliseconds each),
        // caches fill; a fresh process's first second is not what it does.
        wrk(target, &extra, args.connections, 2)?;
        let (rate, p50, p99) = wrk(target, &extra, args.connections, args.seconds)?;
        println!("  {name:<12} {rate:>9.0} req/s   p50 {p50:>7.3} ms   p99 {p99:>7.3} ms");
        rates.push((rate, p50, p99));
    }
    let (nginx_rate, _, nginx_p99) = rates[1];
    let (berth_rate, _, berth_p99) = rates[2];
    let (_, _, straight_p99) = rates[0];
    println!(
        "  berth / nginx: {:.2}x requests/s; p99 added over straight: berth {:+.3} ms, nginx {:+.3} ms",
        berth_rate / nginx_rate,
        berth_p99 - straight_p99,
        nginx_p99 - straight_p99
    );

    println!(
        "WebSocket echo: {} round trips of 32 bytes, one connection",
        args.echoes
    );
    let ws_targets = [
        ("straight", format!("ws://{backend}/user/bench/ws"), None),
        (
            "nginx",
            format!("ws://127.0.0.1:{nginx_port}/user/bench/ws"),
            None,
        ),
        (
            "berth proxy",
            format!("ws://127.0.0.1:{proxy_port}/user/bench/ws"),
            Some(access.as_str()),
        ),
    ];
    for (name, target, token) in &ws_targets {
        let (p50, p99) = echo(target, *token, args.echoes).await?;
        println!("  {name:<12} p50 {p50:>7.3} ms   p99 {p99:>7.3} ms");
    }

    println!(
        "Idle WebSockets: {} held open through each proxy",
        args.idle
    );
    for (name, target, token, pid) in [
        ("nginx", &ws_targets[1].1, None, nginx_pid),
        (
            "berth proxy",
            &ws_targets[2].1,
            Some(access.as_str()),
            proxy_pid,
        ),
    ] {
        let before = rss_of_tree(pid);
        let sockets = open_idle(target, token, args.idle).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_of_tree(pid);
        println!(
            "  {name:<12} {} open: {:.1} MiB before, {:.1} MiB with them ({:+.1} MiB, {:.1} KiB each)",
            sockets.len(),
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            (after as f64 - before as f64) / 1024.0,
            (after as f64 - before as f64) / sockets.len().max(1) as f64
        );
        drop(sockets);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_dir_all(data.with_extension("homes"));
    Ok(())
}

/// Resident memory of a process and its children (nginx's workers), KiB.
fn rss_of_tree(pid: u32) -> u64 {
    let children: Vec<u32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    rss_kib(pid) + children.iter().map(|c| rss_kib(*c)).sum::<u64>()
}

fn nginx_conf(dir: &std::path::Path, port: u16, backend: SocketAddr, idle: usize) -> String {
    format!(
        "worker_processes auto;\nerror_log {dir}/error.log;\npid {dir}/nginx.pid;\n\
         events {{ worker_connections {conns}; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
           fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
           upstream backend {{ server {backend}; keepalive 64; }}\n\
           map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n\
             location / {{\n      proxy_pass http://backend;\n      proxy_http_version 1.1;\n\
               proxy_set_header Host $host;\n      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
               proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection $connection_upgrade;\n\
               proxy_read_timeout 1h;\n    }}\n  }}\n}}\n",
        dir = dir.display(),
        conns = 2 * idle + 1024,
    )
}

/// wrk's requests per second and p50/p99 latency, ms.
async fn connect_ws(
    url: &str,
    token: Option<&str>,
) -> anyhow::Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
> {
    let mut request = url.into_client_request()?;
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    Ok(tokio_tungstenite::connect_async(request).await?.0)
}

/// p50 and p99 of sequential echo round trips, ms.
async fn echo(url: &str, token: Option<&str>, count: usize) -> anyhow::Result<(f64, f64)> {
    let mut socket = connect_ws(url, token).await?;
    let payload = "x".repeat(32);
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let sent = Instant::now();
        socket.send(Message::text(payload.clone())).await?;
        loop {
            match socket.next().await.context("the echo closed")?? {
                Message::Text(_) => break,
                _ => continue,
            }
        }
        times.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok((percentile(&times, 0.5), percentile(&times, 0.99)))
}

/// Opens `count` WebSockets and leaves them idle (100 handshakes at a time).
async fn open_idle(url: &str, token: Option<&str>, count: usize) -> anyhow::Result<Vec<impl Send>> {
    let mut open = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(100) {
        let batch =
            futures::future::try_join_all(chunk.iter().map(|_| connect_ws(url, token))).await?;
        open.extend(batch);
    }
    Ok(open)
}

/// The backend: a short answer to any request, and a WebSocket echo wherever a
/// request asks to upgrade (on any connection, as nginx reuses its kept ones).
async fn backend(port: u16) -> anyhow::Result<()> {
    use hyper::{Response, body::Incoming, server::conn::http1, service::service_fn};
    use hyper_util::rt::TokioIo;
    use tokio_tungstenite::tungstenite::{handshake::derive_accept_key, protocol::Role};

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let service = service_fn(|mut request: hyper::Request<Incoming>| async move {
            let key = request.headers().get("sec-websocket-key").cloned();
            let Some(key) = key else {
                return Ok::<_, std::convert::Infallible>(Response::new(
                    "hello, berth\n".to_owned(),
                ));
            };
            let upgraded = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let Ok(upgraded) = upgraded.await else {
                    return;
                };
                let mut socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(message)) = socket.next().await {
                    if (message.is_text() || message.is_binary())
                        && socket.send(message).await.is_err()
                    {
                        break;
                    }
                }
            });
            let accept = derive_accept_key(key.as_bytes());
            Ok(Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", accept)
                .body(String::new())
                .expect("a response"))
        });
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}
