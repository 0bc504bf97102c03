//! Berth's workers: pull jobs from the queue and drive the container engine.
//!
//! `run` is the composition of one worker over the store it is handed: the
//! consumer of that store's queue (`apalis` on Postgres, `jetstream` with NATS,
//! `embedded` on SQLite), the job handlers (`spawn`, `stop`, `cleanup`,
//! `maintenance`), and the background loops (heartbeats, reconciliation, the
//! slot-freed feed).

pub mod apalis;
pub mod cleanup;
pub mod config;
pub mod context;
pub mod docker;
pub mod embedded;
pub mod jetstream;
pub mod maintenance;
pub mod process;
pub mod reconcile;
pub mod spawn;
pub mod spawner;
pub mod stop;

use std::{sync::Arc, time::Duration};

use schema::{
    Db, JobEnvelope, JobKind,
    db::Dialect,
    jobs::{CONTROL_QUEUE, SPAWN_QUEUE},
    platform::WorkerInfo,
    prelude::*,
};
use tokio_util::sync::CancellationToken;

pub use apalis::queue_config as apalis_config;
pub use config::{DockerConfig, ProcessConfig, PullPolicy, SpawnerKind, WorkerConfig};
use context::{Context, HandlerError};
use docker::DockerSpawner;
use spawner::SpawnError;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("container engine: {0}")]
    Engine(#[from] SpawnError),
    #[error("database: {0}")]
    Store(#[from] schema::StoreError),
    #[error("queue worker: {0}")]
    Queue(String),
    #[error("configuration: {0}")]
    Config(String),
}

/// Runs a worker over `db` until `shutdown` fires: one consumer for spawns and one
/// for stops and cleanups, each with `concurrency` jobs in flight, plus heartbeats
/// and reconciliation. On shutdown it takes no new jobs, hands back spawns still
/// waiting for a slot, and gives the rest `shutdown_grace` seconds.
pub async fn run(
    config: WorkerConfig,
    db: Arc<Db>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let spawner = open_spawner(&config).await?;
    let worker_name = config
        .worker_name
        .clone()
        .unwrap_or_else(default_worker_name);
    let ctx = Arc::new(Context::new(
        db.clone(),
        spawner,
        worker_name.clone(),
        config.max_attempts.max(1),
        shutdown.clone(),
    ));
    // Background work that outlives the consumers by the grace period.
    let jobs_done = CancellationToken::new();
    let (backend, consumers, slot_feed): (&str, Consumers, _) = match db.on() {
        Dialect::Lite(store) => {
            let released = store.release_taken().await?;
            if released > 0 {
                tracing::info!(
                    jobs = released,
                    "jobs taken before the last stop are on the queue again"
                );
            }
            let slot_feed = tokio::spawn({
                let (ctx, freed, done) = (ctx.clone(), store.slot_freed(), jobs_done.clone());
                async move {
                    loop {
                        tokio::select! {
                            _ = freed.notified() => ctx.slot_freed.notify_waiters(),
                            _ = done.cancelled() => return,
                        }
                    }
                }
            });
            let consumers = both_queues(|queue| {
                embedded::consume(
                    ctx.clone(),
                    store.clone(),
                    queue,
                    config.concurrency,
                    shutdown.clone(),
                )
            });
            ("sqlite", consumers, slot_feed)
        }
        Dialect::Pg(store) => {
            let slot_feed = tokio::spawn(apalis::slot_notifications(
                ctx.clone(),
                store.pool().clone(),
                jobs_done.clone(),
            ));
            match store.broker() {
                Some(broker) => {
                    broker
                        .ensure_all(&shutdown)
                        .await
                        .map_err(|e| WorkerError::Queue(e.to_string()))?;
                    for queue in [SPAWN_QUEUE, CONTROL_QUEUE] {
                        tokio::spawn(jetstream::dead_letters(
                            ctx.clone(),
                            broker.clone(),
                            queue,
                            jobs_done.clone(),
                        ));
                    }
                    let consumers = both_queues(|queue| {
                        jetstream::consume(
                            ctx.clone(),
                            broker.clone(),
                            queue,
                            config.concurrency,
                            shutdown.clone(),
                        )
                    });
                    ("nats", consumers, slot_feed)
                }
                None => (
                    "postgres",
                    apalis::consumers(&ctx, store.pool(), &config, &worker_name, &shutdown),
                    slot_feed,
                ),
            }
        }
    };
    drive(
        ctx, &config, backend, consumers, slot_feed, jobs_done, &shutdown,
    )
    .await
}

/// Registers the worker, runs its consumers and background tasks until shutdown
/// (and the grace period), and records its stop.
async fn drive(
    ctx: Arc<Context>,
    config: &WorkerConfig,
    backend: &str,
    mut consumers: Consumers,
    slot_feed: tokio::task::JoinHandle<()>,
    jobs_done: CancellationToken,
    shutdown: &CancellationToken,
) -> Result<(), WorkerError> {
    let worker_name = ctx.worker_name.clone();
    ctx.db
        .register_worker(&WorkerInfo {
            name: worker_name.clone(),
            host: hostname(),
            pid: std::process::id() as i32,
            backend: backend.into(),
            version: env!("CARGO_PKG_VERSION").into(),
        })
        .await?;
    tracing::info!(worker = %worker_name, concurrency = config.concurrency, "worker started");

    let background = [
        tokio::spawn(heartbeats(
            ctx.clone(),
            Duration::from_secs(config.heartbeat.max(1)),
            jobs_done.clone(),
        )),
        tokio::spawn(reconcile_loop(
            ctx.clone(),
            Duration::from_secs(config.reconcile_interval.max(1)),
            jobs_done.clone(),
        )),
        slot_feed,
    ];
    let result = tokio::select! {
        result = &mut consumers => result,
        _ = shutdown.cancelled() => {
            let grace = Duration::from_secs(config.shutdown_grace);
            match tokio::time::timeout(grace, &mut consumers).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(
                        in_flight = ctx.jobs_in_flight(),
                        "the shutdown grace period is over; jobs still running resume on other workers"
                    );
                    Ok(())
                }
            }
        }
    };
    jobs_done.cancel();
    for task in background {
        let _ = task.await;
    }
    if let Err(e) = ctx.db.worker_stopped(&worker_name).await {
        tracing::warn!(error = %e, "could not record the worker's stop");
    }
    tracing::info!(worker = %worker_name, "worker stopped");
    result
}

/// The configured spawner; `auto` takes Docker when its engine answers.
async fn open_spawner(config: &WorkerConfig) -> Result<Arc<dyn spawner::Spawner>, WorkerError> {
    let docker = Arc::new(config.docker.clone());
    let processes = || -> Result<Arc<dyn spawner::Spawner>, WorkerError> {
        let spawner = process::ProcessSpawner::new(docker.clone(), &config.process)?;
        tracing::info!(command = %config.process.server_command, data = %config.process.data_dir.display(), "servers run as local processes");
        Ok(Arc::new(spawner))
    };
    match config.process.spawner.unwrap_or(SpawnerKind::Docker) {
        SpawnerKind::Process => processes(),
        SpawnerKind::Docker => {
            let spawner = DockerSpawner::connect(docker.clone())?;
            spawner.ping().await?;
            Ok(Arc::new(spawner))
        }
        SpawnerKind::Auto => {
            let answered = match DockerSpawner::connect(docker.clone()) {
                Ok(spawner) => spawner.ping().await.map(|()| spawner),
                Err(e) => Err(e),
            };
            match answered {
                Ok(spawner) => Ok(Arc::new(spawner)),
                Err(e) => {
                    tracing::warn!(error = %e, "no Docker engine answers");
                    processes()
                }
            }
        }
    }
}

type Consumers = std::pin::Pin<Box<dyn Future<Output = Result<(), WorkerError>> + Send>>;

/// The spawn queue's and the control queue's consumers, run together.
fn both_queues<Fut>(consume: impl Fn(&'static str) -> Fut) -> Consumers
where
    Fut: Future<Output = Result<(), WorkerError>> + Send + 'static,
{
    let (spawns, control) = (consume(SPAWN_QUEUE), consume(CONTROL_QUEUE));
    Box::pin(async move { tokio::try_join!(spawns, control).map(|_| ()) })
}

async fn heartbeats(ctx: Arc<Context>, every: Duration, done: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = done.cancelled() => return,
        }
        if let Err(e) = ctx
            .db
            .worker_heartbeat(&ctx.worker_name, ctx.jobs_in_flight())
            .await
        {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}

/// Reconciles at start-up, then every `every`.
async fn reconcile_loop(ctx: Arc<Context>, every: Duration, done: CancellationToken) {
    loop {
        if let Err(e) = reconcile::reconcile(&ctx).await {
            tracing::warn!(error = %e, "reconciliation failed; trying again later");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = done.cancelled() => return,
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn default_worker_name() -> String {
    format!("{}-{}", hostname(), std::process::id())
}

/// The span every log line about a job is in: its id and kind, and (once read)
/// its user and server.
pub(crate) fn job_span(envelope: &JobEnvelope) -> tracing::Span {
    tracing::info_span!(
        "job",
        id = %envelope.job_id,
        kind = envelope.kind.as_str(),
        user = tracing::field::Empty,
        server = tracing::field::Empty
    )
}

/// Runs the job a queue delivered, whichever backend delivered it. An error means
/// the backend should deliver it again.
pub(crate) async fn run_job(envelope: JobEnvelope, ctx: &Context) -> Result<(), HandlerError> {
    let job_id = envelope.job_id;
    let Some(job) = ctx.db.get_job(job_id).await?.filter(context::still_open) else {
        tracing::debug!(job = %job_id, "job already ended; duplicate delivery ignored");
        return Ok(());
    };
    // The job's span (opened by the backend's handler) names its user and server.
    let span = tracing::Span::current();
    span.record("user", job.user_name.as_str());
    if let Some(server) = &job.server_name {
        span.record("server", server.as_str());
    }
    let _counted = ctx.count_in_flight();
    let result = match envelope.kind {
        JobKind::Spawn => spawn::run(ctx, &job).await,
        JobKind::Stop => stop::run(ctx, &job).await,
        JobKind::Cleanup => cleanup::run(ctx, &job).await,
        JobKind::Cull | JobKind::ExpireSessions | JobKind::Archive => {
            maintenance::run(ctx, &job, envelope.kind).await
        }
    };
    drop(_counted);
    match result {
        Ok(()) => Ok(()),
        Err(HandlerError::HandOff) => {
            tracing::info!(job = %job_id, "handed back to the queue at shutdown");
            Err(HandlerError::HandOff)
        }
        Err(e) => {
            tracing::warn!(job = %job_id, error = %e, "job hit an error; it will be handed out again");
            Err(e)
        }
    }
}
