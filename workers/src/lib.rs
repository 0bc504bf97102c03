//! Berth's workers: pull jobs from the queue and drive the container engine.

pub mod cleanup;
pub mod config;
pub mod context;
pub mod docker;
pub mod spawn;
pub mod spawner;
pub mod stop;

use std::sync::Arc;

use apalis::prelude::{BoxDynError, Data, WorkerBuilder, WorkerBuilderExt};
use apalis_postgres::PostgresStorage;
use schema::{
    ApalisQueue, JobEnvelope, JobKind, JobOutcome, PgStore,
    jobs::{CONTROL_QUEUE, SPAWN_QUEUE},
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use config::{DockerConfig, PullPolicy, WorkerConfig};
use context::Context;
use docker::DockerSpawner;
use spawner::SpawnError;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("container engine: {0}")]
    Engine(#[from] SpawnError),
    #[error("queue worker: {0}")]
    Queue(String),
}

/// Runs a worker until `shutdown` fires: one consumer for spawns and one for
/// stops and cleanups, each with `concurrency` jobs in flight.
pub async fn run(
    config: WorkerConfig,
    pool: PgPool,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let spawner = DockerSpawner::connect(Arc::new(config.docker.clone()))?;
    spawner.ping().await?;
    let worker_name = config
        .worker_name
        .clone()
        .unwrap_or_else(default_worker_name);
    let ctx = Arc::new(Context {
        store: Arc::new(PgStore::new(pool.clone(), Arc::new(ApalisQueue))),
        spawner: Arc::new(spawner),
        worker_name: worker_name.clone(),
    });
    tracing::info!(worker = %worker_name, concurrency = config.concurrency, "worker started");
    let consume = |queue: &'static str| {
        let storage = PostgresStorage::<JobEnvelope>::new(&pool)
            .with_config(apalis_postgres::Config::default().queue(queue))
            .with_pubsub();
        let worker = WorkerBuilder::new(format!("{worker_name}/{queue}"))
            .backend(storage)
            .data(ctx.clone())
            .concurrency(config.concurrency)
            .build(handle);
        let shutdown = shutdown.clone();
        async move {
            worker
                .run_until(async move {
                    shutdown.cancelled().await;
                    Ok::<(), std::io::Error>(())
                })
                .await
                .map_err(|e| WorkerError::Queue(e.to_string()))
        }
    };
    tokio::try_join!(consume(SPAWN_QUEUE), consume(CONTROL_QUEUE))?;
    tracing::info!(worker = %worker_name, "worker stopped");
    Ok(())
}

fn default_worker_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}

async fn handle(envelope: JobEnvelope, ctx: Data<Arc<Context>>) -> Result<(), BoxDynError> {
    // Every log line about the job carries its id and kind.
    let span = tracing::info_span!("job", id = %envelope.job_id, kind = envelope.kind.as_str());
    run_job(envelope, &ctx).instrument(span).await
}

async fn run_job(envelope: JobEnvelope, ctx: &Context) -> Result<(), BoxDynError> {
    let job_id = envelope.job_id;
    let Some(job) = ctx.store.begin_job(job_id, &ctx.worker_name).await? else {
        tracing::debug!(job = %job_id, "job already finished; duplicate delivery ignored");
        return Ok(());
    };
    let outcome = match envelope.kind {
        JobKind::Spawn => spawn::run(ctx, &job).await,
        JobKind::Stop => stop::run(ctx, &job).await,
        JobKind::Cleanup => cleanup::run(ctx, &job).await,
    };
    match outcome {
        Ok(outcome) => {
            if let JobOutcome::Failed(why) = &outcome {
                tracing::warn!(job = %job_id, error = %why, "job failed");
            }
            ctx.store.finish_job(job_id, &outcome).await?;
            Ok(())
        }
        Err(e) => {
            tracing::warn!(job = %job_id, error = %e, "job hit an error; it will be handed out again");
            Err(e.into())
        }
    }
}
