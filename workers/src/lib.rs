//! Berth's workers: pull jobs from the queue and drive the container engine.

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

use apalis::prelude::{
    Attempt, BoxDynError, Data, PollWith, Strategy, WorkerBuilder, WorkerBuilderExt,
};
use apalis_postgres::{PostgresStorage, Pubsub};
use schema::{
    JobEnvelope, JobKind, PgStore,
    jobs::{CONTROL_QUEUE, SPAWN_QUEUE},
    nats::Broker,
    pg_locks::SLOT_FREED_CHANNEL,
    platform::WorkerInfo,
    queue::MAX_DELIVERIES,
};
use sqlx::{PgPool, postgres::PgListener};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

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

/// Runs a worker until `shutdown` fires: one consumer for spawns and one for
/// stops and cleanups, each with `concurrency` jobs in flight, plus heartbeats and
/// reconciliation. On shutdown it takes no new jobs, hands back spawns still
/// waiting for a slot, and gives the rest `shutdown_grace` seconds.
pub async fn run(
    config: WorkerConfig,
    pool: PgPool,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let spawner = open_spawner(&config).await?;
    let worker_name = worker_name(&config);
    let jobs_done = CancellationToken::new();
    let (queue, broker) = config
        .queue
        .open(&pool, jobs_done.clone())
        .await
        .map_err(|e| WorkerError::Queue(e.to_string()))?;
    if let Some(broker) = &broker {
        broker
            .ensure_all(&shutdown)
            .await
            .map_err(|e| WorkerError::Queue(e.to_string()))?;
    }
    let store = Arc::new(schema::Db::from(PgStore::new(pool.clone(), queue)));
    let ctx = context(store, spawner, worker_name.clone(), &config, &shutdown);
    let slots = tokio::spawn(slot_notifications(
        ctx.clone(),
        pool.clone(),
        jobs_done.clone(),
    ));
    let consumers = match broker {
        Some(broker) => {
            for queue in [SPAWN_QUEUE, CONTROL_QUEUE] {
                tokio::spawn(jetstream::dead_letters(
                    ctx.clone(),
                    broker.clone(),
                    queue,
                    jobs_done.clone(),
                ));
            }
            nats_consumers(&ctx, broker, config.concurrency, &shutdown)
        }
        None => apalis_consumers(&ctx, &pool, &config, &worker_name, &shutdown),
    };
    drive(
        ctx,
        &config,
        config.queue.name(),
        consumers,
        slots,
        jobs_done,
        &shutdown,
    )
    .await
}

/// `run` on the embedded store (`berth up` without a database): the same worker,
/// fed by the store's own queue in this process.
pub async fn run_embedded(
    config: WorkerConfig,
    store: schema::SqliteStore,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let spawner = open_spawner(&config).await?;
    let worker_name = worker_name(&config);
    let jobs_done = CancellationToken::new();
    let released = store.release_taken().await?;
    if released > 0 {
        tracing::info!(
            jobs = released,
            "jobs taken before the last stop are on the queue again"
        );
    }
    let shared = Arc::new(schema::Db::from(store.clone()));
    let ctx = context(shared, spawner, worker_name, &config, &shutdown);
    let slots = tokio::spawn({
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
    let consume = |queue| {
        embedded::consume(
            ctx.clone(),
            store.clone(),
            queue,
            config.concurrency,
            shutdown.clone(),
        )
    };
    let (spawns, control) = (consume(SPAWN_QUEUE), consume(CONTROL_QUEUE));
    let consumers: Consumers =
        Box::pin(async move { tokio::try_join!(spawns, control).map(|_| ()) });
    drive(
        ctx, &config, "sqlite", consumers, slots, jobs_done, &shutdown,
    )
    .await
}

fn worker_name(config: &WorkerConfig) -> String {
    config
        .worker_name
        .clone()
        .unwrap_or_else(default_worker_name)
}

/// The handlers' context over one store that is every interface at once.
fn context<S>(
    store: Arc<S>,
    spawner: Arc<dyn spawner::Spawner>,
    worker_name: String,
    config: &WorkerConfig,
    shutdown: &CancellationToken,
) -> Arc<Context>
where
    S: schema::Store + schema::Console + schema::Platform + schema::Maintenance,
{
    Arc::new(Context::new(
        store.clone(),
        store.clone(),
        store.clone(),
        store,
        spawner,
        worker_name,
        config.limits,
        config.max_attempts.max(1),
        shutdown.clone(),
    ))
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
    ctx.platform
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
    if let Err(e) = ctx.platform.worker_stopped(&worker_name).await {
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

fn nats_consumers(
    ctx: &Arc<Context>,
    broker: Broker,
    concurrency: usize,
    shutdown: &CancellationToken,
) -> Consumers {
    let spawns = jetstream::consume(
        ctx.clone(),
        broker.clone(),
        SPAWN_QUEUE,
        concurrency,
        shutdown.clone(),
    );
    let control = jetstream::consume(
        ctx.clone(),
        broker,
        CONTROL_QUEUE,
        concurrency,
        shutdown.clone(),
    );
    Box::pin(async move { tokio::try_join!(spawns, control).map(|_| ()) })
}

fn apalis_consumers(
    ctx: &Arc<Context>,
    pool: &PgPool,
    config: &WorkerConfig,
    worker_name: &str,
    shutdown: &CancellationToken,
) -> Consumers {
    // A consumer whose queue connection fails (the database restarted, a pool
    // timeout under load) is rebuilt after a pause instead of taking the worker down.
    let consume = |queue: &'static str| {
        let build = {
            let pool = pool.clone();
            let ctx = ctx.clone();
            let config = config.clone();
            move |id: &str| {
                let queue_config = apalis_config(
                    queue,
                    config.concurrency,
                    config.heartbeat,
                    config.missed_heartbeats,
                );
                // NOTIFY wakes a worker the moment a job is inserted; the interval
                // catches what NOTIFY never announces: jobs handed back, retried or
                // taken over from a dead worker.
                let strategy = Strategy::new()
                    .stream(Pubsub::new(pool.clone(), queue.to_owned()))
                    .interval(Duration::from_millis(config.poll_interval_ms.max(5)));
                let storage = PollWith::new(
                    PostgresStorage::<JobEnvelope>::new(&pool).with_config(queue_config),
                    strategy,
                );
                WorkerBuilder::new(id)
                    .backend(storage)
                    .data(ctx.clone())
                    .concurrency(config.concurrency)
                    .build(handle)
            }
        };
        let shutdown = shutdown.clone();
        let (pool, worker_name) = (pool.clone(), worker_name.to_owned());
        async move {
            // Each consumer has an id of its own: the tasks of one that failed are
            // handed back, not mistaken for its successor's.
            for incarnation in 0u64.. {
                let id = format!("{worker_name}/{queue}/{incarnation}");
                let stop = shutdown.clone();
                let ran = build(&id)
                    .run_until(async move {
                        stop.cancelled().await;
                        Ok::<(), std::io::Error>(())
                    })
                    .await;
                match ran {
                    Ok(()) => return Ok::<(), WorkerError>(()),
                    Err(e) if !shutdown.is_cancelled() => {
                        tracing::warn!(queue, error = %e, "queue consumer failed; restarting it in 1 s");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = shutdown.cancelled() => return Ok(()),
                        }
                        // Its jobs' futures were dropped with it. Should the database
                        // not answer yet, apalis hands them back once the failed
                        // consumer's heartbeats are overdue.
                        match schema::queue::hand_back_apalis_tasks(&pool, &id).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(
                                queue,
                                jobs = n,
                                "the failed consumer's jobs are on the queue again"
                            ),
                            Err(e) => {
                                tracing::warn!(queue, error = %e, "could not hand back the failed consumer's jobs; they return when its heartbeats are overdue")
                            }
                        }
                    }
                    Err(e) => return Err(WorkerError::Queue(e.to_string())),
                }
            }
            Ok(())
        }
    };
    let (spawns, control) = (consume(SPAWN_QUEUE), consume(CONTROL_QUEUE));
    Box::pin(async move { tokio::try_join!(spawns, control).map(|_| ()) })
}

/// How `berth worker` consumes one apalis-postgres queue: each fetch takes up to as
/// many tasks as the worker runs at once (apalis's default batch of 10 capped a
/// worker at about a thousand no-op jobs a second).
pub fn apalis_config(
    queue: &str,
    concurrency: usize,
    heartbeat_secs: u64,
    missed_heartbeats: usize,
) -> apalis_postgres::Config {
    apalis_postgres::Config::default()
        .queue(queue)
        .batch_size(concurrency.max(1))
        .heartbeat_interval(Duration::from_secs(heartbeat_secs.max(1)))
        .missed_heartbeats(missed_heartbeats.max(1))
}

async fn heartbeats(ctx: Arc<Context>, every: Duration, done: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = done.cancelled() => return,
        }
        if let Err(e) = ctx
            .platform
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

/// Wakes this worker's waiting spawns whenever any worker frees a slot.
async fn slot_notifications(ctx: Arc<Context>, pool: PgPool, done: CancellationToken) {
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(SLOT_FREED_CHANNEL).await?;
            loop {
                listener.recv().await?;
                ctx.slot_freed.notify_waiters();
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            result = listener => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "slot notifications lost; waiting spawns poll until they resume");
                }
            }
            _ = done.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
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

async fn handle(
    envelope: JobEnvelope,
    ctx: Data<Arc<Context>>,
    attempt: Attempt,
) -> Result<(), BoxDynError> {
    match run_job(envelope, &ctx)
        .instrument(job_span(&envelope))
        .await
    {
        Ok(()) => Ok(()),
        // apalis counts deliveries from 0: this was the last one it makes.
        Err(e) if attempt.current() + 1 >= MAX_DELIVERIES && e.may_dead_letter() => {
            let why = format!("gave up after {MAX_DELIVERIES} deliveries: {e}");
            if ctx.store.dead_letter(envelope.job_id, &why).await? {
                tracing::error!(job = %envelope.job_id, error = %why, "job dead-lettered");
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
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
    let Some(job) = ctx.store.get_job(job_id).await?.filter(context::still_open) else {
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
