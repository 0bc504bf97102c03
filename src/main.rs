//! `berth`: the one binary of every Berth process.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use schema::{Db, PgStore};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions, PgSslMode},
};
use tokio_util::sync::CancellationToken;

mod embedded;
mod memory;
mod sample;

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "Per-user container workspaces, driven by a job queue"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct Common {
    /// Postgres URL (`postgres://user:password@host/db`); required except by `berth up`,
    /// which without one keeps everything in an embedded SQLite database.
    #[arg(
        long,
        env = "BERTH_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    database_url: Option<String>,

    /// Queue backend.
    #[arg(
        long,
        env = "BERTH_QUEUE",
        value_enum,
        default_value = "postgres",
        global = true
    )]
    queue: QueueBackend,

    /// Most database connections this process opens; default 24 for the API and
    /// 4 × the worker concurrency + 8 for a worker (a spawn holds a slot connection
    /// and a server-lock connection, and needs two more for its queries and its
    /// progress events).
    #[arg(long, env = "BERTH_DB_MAX_CONNECTIONS", global = true)]
    db_max_connections: Option<u32>,

    /// Spawns in flight at once, platform-wide (an admin may override it at runtime).
    #[arg(
        long,
        env = "BERTH_CONCURRENT_SPAWN_LIMIT",
        default_value_t = schema::Limits::default().concurrent_spawn_limit,
        global = true,
        value_parser = |s: &str| schema::settings::at_least("BERTH_CONCURRENT_SPAWN_LIMIT", 1_u32, s)
    )]
    concurrent_spawn_limit: u32,

    /// Servers pending or running at once, platform-wide (an admin may override it at runtime).
    #[arg(
        long,
        env = "BERTH_ACTIVE_SERVER_LIMIT",
        default_value_t = schema::Limits::default().active_server_limit,
        global = true,
        value_parser = |s: &str| schema::settings::at_least("BERTH_ACTIVE_SERVER_LIMIT", 1_u32, s)
    )]
    active_server_limit: u32,

    /// NATS servers (with `--queue nats`), comma-separated.
    #[arg(
        long,
        env = "BERTH_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    nats_url: String,

    /// JetStream stream of Berth's jobs (created when missing, with the settings below).
    #[arg(
        long,
        env = "BERTH_NATS_STREAM",
        default_value = "berth_jobs",
        global = true
    )]
    nats_stream: String,

    /// Seconds a delivered job may go without a sign of life before JetStream hands
    /// it to another worker (a live worker signs every third of it).
    #[arg(long, env = "BERTH_NATS_ACK_WAIT", default_value_t = 30, global = true)]
    nats_ack_wait: u64,

    /// Deliveries of one job before it is dead-lettered (marked failed).
    #[arg(
        long,
        env = "BERTH_NATS_MAX_DELIVER",
        default_value_t = 25,
        global = true
    )]
    nats_max_deliver: i64,

    /// Stream replicas (3 on a three-node JetStream cluster).
    #[arg(long, env = "BERTH_NATS_REPLICAS", default_value_t = 1, global = true)]
    nats_replicas: usize,

    /// Log format.
    #[arg(
        long,
        env = "BERTH_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,

    /// Log filter, in `tracing` syntax (e.g. `info,berth=debug`).
    #[arg(
        long,
        env = "BERTH_LOG",
        default_value = "info,sqlx=warn",
        global = true
    )]
    log: String,

    /// Where `berth worker` and `berth scheduler` serve `GET /metrics` (Prometheus
    /// text); none: not served. The API serves `/metrics` on its own address.
    #[arg(long, env = "BERTH_METRICS_LISTEN", global = true)]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum QueueBackend {
    /// apalis-postgres: jobs in the same database as everything else.
    Postgres,
    /// NATS JetStream, fed from a Postgres outbox.
    Nats,
}

impl Common {
    fn limits(&self) -> schema::Limits {
        schema::Limits {
            concurrent_spawn_limit: self.concurrent_spawn_limit,
            active_server_limit: self.active_server_limit,
        }
    }

    fn queue(&self) -> schema::QueueSettings {
        match self.queue {
            QueueBackend::Postgres => schema::QueueSettings::Postgres,
            QueueBackend::Nats => {
                let mut nats = schema::nats::NatsSettings::new(&self.nats_url, &self.nats_stream);
                nats.ack_wait = Duration::from_secs(self.nats_ack_wait.max(1));
                nats.max_deliver = self.nats_max_deliver.max(1);
                nats.replicas = self.nats_replicas.max(1);
                schema::QueueSettings::Nats(nats)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start-up
enum Command {
    /// Create or update the database tables, then exit.
    Migrate,
    /// Serve the HTTP API.
    Api(api::ApiConfig),
    /// Serve users' servers under /user/ (the proxy; any number of replicas).
    Proxy(api::ApiConfig),
    /// Pull jobs from the queue and drive the container engine.
    Worker(workers::WorkerConfig),
    /// Enqueue periodic work (culling, session expiry, archiving) on cron schedules.
    Scheduler(scheduler::SchedulerConfig),
    /// A small server of the user's working directory: the default server command
    /// of local-process servers (try Berth with no image).
    SampleServer,
    /// Migrate, then run the API, a worker and the scheduler in one process. With no
    /// database URL, on an embedded SQLite database in BERTH_DATA_DIR.
    Up {
        #[command(flatten)]
        api: api::ApiConfig,
        #[command(flatten)]
        worker: workers::WorkerConfig,
        #[command(flatten)]
        scheduler: scheduler::SchedulerConfig,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(&cli.common);
    memory::give_back_freed();
    let json = matches!(cli.common.log_format, LogFormat::Json);
    let shutdown = shutdown_on_signal();
    // The store's own background work (the NATS outbox relay) outlives the roles,
    // so that jobs enqueued during a shutdown's grace period still reach the broker.
    let background = CancellationToken::new();
    let result = run(cli, shutdown, background.clone()).await;
    background.cancel();
    match result {
        // In JSON mode the reason is one JSON line too, not Rust's plain `Error:`.
        Err(e) if json => {
            tracing::error!(error = format!("{e:#}"), "berth stopped");
            std::process::exit(1)
        }
        result => result,
    }
}

/// The composition root: builds the one store of this process and hands it to
/// each role it runs.
async fn run(
    cli: Cli,
    shutdown: CancellationToken,
    background: CancellationToken,
) -> anyhow::Result<()> {
    let common = &cli.common;
    let pool_size = common.db_max_connections.unwrap_or(match &cli.command {
        Command::Worker(worker) => worker_pool_size(worker),
        Command::Up { worker, .. } => API_POOL_SIZE + worker_pool_size(worker),
        Command::Api(_)
        | Command::Proxy(_)
        | Command::Scheduler(_)
        | Command::Migrate
        | Command::SampleServer => API_POOL_SIZE,
    });
    if let (Some(address), Command::Worker(_) | Command::Scheduler(_)) =
        (common.metrics_listen, &cli.command)
    {
        serve_metrics(address, shutdown.clone()).await?;
    }
    match cli.command {
        Command::SampleServer => sample::run().await?,
        Command::Migrate => {
            schema::migrate(&connect(common, pool_size).await?).await?;
            tracing::info!("database is up to date");
        }
        Command::Api(config) => {
            let db = open_store(common, pool_size, &background).await?;
            serve_api(config, db, shutdown, api::Serve::Api).await?
        }
        Command::Proxy(config) => {
            let db = open_store(common, pool_size, &background).await?;
            serve_api(config, db, shutdown, api::Serve::Proxy).await?
        }
        Command::Worker(config) => {
            let db = open_store(common, pool_size, &background).await?;
            workers::run(config, db, shutdown).await?
        }
        Command::Scheduler(config) => {
            let db = open_store(common, pool_size, &background).await?;
            scheduler::run(config, db, shutdown).await?
        }
        Command::Up {
            mut api,
            mut worker,
            scheduler,
        } => {
            if common.database_url.is_none() {
                return embedded::up(common, api, worker, scheduler, shutdown).await;
            }
            prepare_up(&mut api, &mut worker);
            schema::migrate(&connect(common, pool_size).await?).await?;
            let db = open_store(common, pool_size, &background).await?;
            all_roles(
                &shutdown,
                serve_api(api, db.clone(), shutdown.clone(), api::Serve::Both),
                async {
                    workers::run(worker, db.clone(), shutdown.clone())
                        .await
                        .map_err(Into::into)
                },
                async {
                    scheduler::run(scheduler, db.clone(), shutdown.clone())
                        .await
                        .map_err(Into::into)
                },
            )
            .await?;
        }
    }
    Ok(())
}

/// The Postgres store with the configured queue backend and limits.
async fn open_store(
    common: &Common,
    pool_size: u32,
    background: &CancellationToken,
) -> anyhow::Result<Arc<Db>> {
    let pool = connect(common, pool_size).await?;
    let store = PgStore::open(pool, &common.queue(), background.clone())
        .await
        .context("opening the queue")?;
    started();
    Ok(Arc::new(Db::from(store).with_limits(common.limits())))
}

/// What `berth up` sets on its roles, on either store: local processes when no
/// engine answers (a newcomer's one command); the API shows the local-process
/// servers' logs; servers are told the API's address as given by flag too.
fn prepare_up(api: &mut api::ApiConfig, worker: &mut workers::WorkerConfig) {
    worker.docker.api_listen = api.listen;
    worker
        .process
        .spawner
        .get_or_insert(workers::SpawnerKind::Auto);
    api.server_logs.get_or_insert_with(|| {
        worker
            .process
            .data_dir
            .join(&worker.docker.instance)
            .join("logs")
    });
}

/// Runs the API, worker and scheduler of `berth up` together until all have
/// stopped; whichever fails first takes the others down with it.
async fn all_roles(
    shutdown: &CancellationToken,
    api: impl Future<Output = anyhow::Result<()>>,
    worker: impl Future<Output = anyhow::Result<()>>,
    scheduler: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let stop_all = |result: anyhow::Result<()>| {
        if result.is_err() {
            shutdown.cancel();
        }
        result
    };
    let (a, w, s) = tokio::join!(
        async { stop_all(api.await) },
        async { stop_all(worker.await) },
        async { stop_all(scheduler.await) },
    );
    a.and(w).and(s)
}

async fn serve_api(
    config: api::ApiConfig,
    db: Arc<Db>,
    shutdown: CancellationToken,
    serve: api::Serve,
) -> anyhow::Result<()> {
    let listener =
        api::serve::bind(config.listen).with_context(|| format!("binding {}", config.listen))?;
    api::run(config, db, listener, shutdown, serve).await?;
    Ok(())
}

/// `GET /metrics` for a worker or scheduler: this process's own counters.
async fn serve_metrics(
    address: std::net::SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener =
        api::serve::bind(address).with_context(|| format!("binding {address} for metrics"))?;
    tracing::info!(address = %listener.local_addr()?, "metrics listening");
    let handle = schema::telemetry::install();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(())
}

const API_POOL_SIZE: u32 = 24;

fn worker_pool_size(worker: &workers::WorkerConfig) -> u32 {
    4 * worker.concurrency as u32 + 8
}

async fn connect(common: &Common, pool_size: u32) -> anyhow::Result<PgPool> {
    let url = common
        .database_url
        .as_deref()
        .context("BERTH_DATABASE_URL (or --database-url) is required")?;
    // Checked here, not by clap, whose refusal would print the URL, password and all.
    schema::settings::postgres_url("BERTH_DATABASE_URL", url).map_err(anyhow::Error::msg)?;
    // One connection first: the pool retries until its timeout and then says only
    // that it timed out, where this says why (refused, no such host, a password).
    let where_ = url
        .rsplit_once('@')
        .map_or(url, |(_, host)| host)
        .trim_start_matches("//");
    let options = connect_options(url, std::env::var_os("PGSSLMODE").is_some())?;
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        sqlx::ConnectOptions::connect(&options),
    )
    .await
    .map_err(|_| anyhow::anyhow!("connecting to the database at {where_}: no answer in 10 s"))?
    .with_context(|| format!("connecting to the database at {where_}"))?;
    let _ = sqlx::Connection::close(first).await;
    PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .context("connecting to the database")
}

/// The database's connection options. sqlx prefers TLS wherever the server offers
/// it (Debian's Postgres does); to a database on this machine (a loopback address,
/// `localhost`) Berth connects without it unless the URL (`sslmode=`) or
/// `PGSSLMODE` asks: it protects nothing on loopback and took about a fifth of
/// Berth's CPU in a Docker storm (ops/bench/storm, 3.6–4.5 s without, 4.5–5.4 s
/// with). Elsewhere sqlx's `prefer` stays.
fn connect_options(url: &str, env_sslmode: bool) -> anyhow::Result<PgConnectOptions> {
    let options: PgConnectOptions = url.parse()?;
    let asked = env_sslmode || url.contains("sslmode=");
    let host = options.get_host();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    Ok(if loopback && !asked {
        options.ssl_mode(PgSslMode::Disable)
    } else {
        options
    })
}

fn init_logs(common: &Common) {
    let filter = tracing_subscriber::EnvFilter::try_new(&common.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match common.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Cancelled on SIGINT or SIGTERM: every role stops taking work and drains.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        // Before the roles run there is nothing to drain: a start-up that waits
        // (for a database, a broker, a lock) ends now, not when it gives up.
        if !STARTED.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::warn!("interrupted while starting; nothing was running yet");
            std::process::exit(130);
        }
        tracing::info!("shutting down");
        trigger.cancel();
    });
    token
}

/// Set once this process's roles run: from then on a signal drains them.
static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The roles are about to run: signals now shut them down gracefully.
pub(crate) fn started() {
    STARTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_on_this_machine_is_reached_without_tls_unless_asked() {
        let mode = |url: &str, env: bool| connect_options(url, env).unwrap().get_ssl_mode();
        let disabled = |m: PgSslMode| matches!(m, PgSslMode::Disable);
        let preferred = |m: PgSslMode| matches!(m, PgSslMode::Prefer);
        assert!(disabled(mode("postgres://u:p@127.0.0.1:5432/berth", false)));
        assert!(disabled(mode("postgres://u:p@localhost/berth", false)));
        assert!(disabled(mode("postgres://u:p@[::1]:5432/berth", false)));
        assert!(preferred(mode(
            "postgres://u:p@db.example.org/berth",
            false
        )));
        assert!(preferred(mode("postgres://u:p@10.0.0.5/berth", false)));
        assert!(matches!(
            mode("postgres://u:p@127.0.0.1/berth?sslmode=require", false),
            PgSslMode::Require
        ));
        // PGSSLMODE set: sqlx reads it; Berth does not override it.
        assert!(!disabled(mode("postgres://u:p@127.0.0.1/berth", true)));
    }
}
