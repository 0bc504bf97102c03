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
pub mod os_user;
pub mod process;
pub mod reconcile;
pub mod slot_line;
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

pub use apalis::{Gated, queue_backend};
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
    let others = {
        let config = config.clone();
        Box::new(move |kind: &str| other_spawner(&config, kind))
    };
    let ctx = Arc::new(Context::new(
        db.clone(),
        spawner,
        others,
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
                            _ = freed.notified() => ctx.slot_line.freed(),
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

/// Which spawner a worker uses, and why: what `berth up`'s banner and every
/// worker's log say at start.
#[derive(Debug, Clone)]
pub struct SpawnerChoice {
    pub kind: SpawnerKind,
    pub why: String,
    /// With local processes: who they run as, and whether that is Berth's own user
    /// (then a user's code can read what Berth can).
    pub runs_as: Option<(String, bool)>,
}

impl SpawnerChoice {
    /// One paragraph for a person: the spawner, why, and the warning when it applies.
    pub fn describe(&self) -> String {
        match (&self.kind, &self.runs_as) {
            (SpawnerKind::Process, Some((user, true))) => format!(
                "local processes ({}); they run as {user}, the same OS user as Berth, so a \
                 user's code can read Berth's database and secrets: this suits one person, not \
                 a class (run Berth as root with BERTH_PROCESS_USER, or use Docker)",
                self.why
            ),
            (SpawnerKind::Process, Some((user, false))) => {
                format!("local processes ({}), run as {user}", self.why)
            }
            _ => format!("Docker containers ({})", self.why),
        }
    }
}

/// Decides the spawner: `docker`, `process`, or `auto` (Docker when its engine
/// answers, else local processes). Fails when `BERTH_PROCESS_USER` cannot apply.
pub async fn choose_spawner(config: &WorkerConfig) -> Result<SpawnerChoice, WorkerError> {
    let asked = config.process.spawner.unwrap_or(SpawnerKind::Docker);
    let (kind, why) = match asked {
        SpawnerKind::Docker => (SpawnerKind::Docker, "BERTH_SPAWNER=docker".to_owned()),
        SpawnerKind::Process => (SpawnerKind::Process, "BERTH_SPAWNER=process".to_owned()),
        SpawnerKind::Auto => {
            let docker = Arc::new(config.docker.clone());
            let answered = match DockerSpawner::connect(docker) {
                Ok(spawner) => spawner.ping().await,
                Err(e) => Err(e),
            };
            match answered {
                Ok(()) => (SpawnerKind::Docker, "a Docker engine answers".to_owned()),
                Err(e) => (
                    SpawnerKind::Process,
                    format!("no Docker engine answers: {e}"),
                ),
            }
        }
    };
    let runs_as = match (kind, &config.process.process_user) {
        (SpawnerKind::Process, Some(user)) => {
            os_user::OsUser::resolve(user).map_err(WorkerError::Config)?;
            if os_user::effective_uid() != Some(0) {
                return Err(WorkerError::Config(
                    "BERTH_PROCESS_USER needs Berth to run as root (to start servers as another user)"
                        .into(),
                ));
            }
            Some((user.clone(), false))
        }
        (SpawnerKind::Process, None) => Some((os_user::own_name(), true)),
        _ => None,
    };
    Ok(SpawnerChoice { kind, why, runs_as })
}

/// A spawner of `kind` for servers another worker (or this one before a restart
/// with another `BERTH_SPAWNER`) started: made from this worker's settings, which
/// name the same engine, data directory and instance.
fn other_spawner(
    config: &WorkerConfig,
    kind: &str,
) -> Result<Arc<dyn spawner::Spawner>, SpawnError> {
    let docker = Arc::new(config.docker.clone());
    match kind {
        "docker" => Ok(Arc::new(DockerSpawner::connect(docker)?)),
        "process" => Ok(Arc::new(process::ProcessSpawner::new(
            docker,
            &config.process,
        )?)),
        other => Err(SpawnError::Engine(format!(
            "the server was started by a spawner this Berth does not know: {other:?}"
        ))),
    }
}

/// The chosen spawner, said in the log at every start.
async fn open_spawner(config: &WorkerConfig) -> Result<Arc<dyn spawner::Spawner>, WorkerError> {
    let choice = choose_spawner(config).await?;
    let docker = Arc::new(config.docker.clone());
    match choice.runs_as {
        Some((_, true)) => tracing::warn!("servers run as {}", choice.describe()),
        _ => tracing::info!("servers run as {}", choice.describe()),
    }
    Ok(match choice.kind {
        SpawnerKind::Process => Arc::new(process::ProcessSpawner::new(docker, &config.process)?),
        _ => {
            let spawner = DockerSpawner::connect(docker)?;
            spawner.ping().await?;
            Arc::new(spawner)
        }
    })
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

/// Reports this worker alive every `every` (and samples the platform for the
/// dashboard's charts).
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
        // The dashboard's charts: one sample a minute, by whichever worker is first.
        if let Err(e) = ctx.db.record_sample().await {
            tracing::warn!(error = %e, "could not record the platform's sample");
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
