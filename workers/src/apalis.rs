//! The apalis-postgres consumers (`BERTH_QUEUE=postgres`): one per queue, rebuilt
//! under a new id when its connection fails, and the NOTIFY feed that wakes spawns
//! waiting for a slot.

use std::{
    sync::Arc,
    task::{self, Poll},
    time::Duration,
};

use apalis::prelude::{
    Attempt, BoxDynError, Data, PollSnapshot, PollStrategy, PollWith, Strategy, WorkerBuilder,
    WorkerBuilderExt,
};
use apalis_postgres::{PostgresStorage, Pubsub};
use futures::StreamExt;
use schema::{JobEnvelope, pg_locks::SLOT_FREED_CHANNEL, prelude::*, queue::MAX_DELIVERIES};
use sqlx::{PgPool, postgres::PgListener};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Consumers, WorkerConfig, WorkerError, context::Context, job_span, run_job};

/// The spawn and control consumers of one worker.
pub(crate) fn consumers(
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
                let queue_config = queue_config(
                    queue,
                    config.concurrency,
                    config.heartbeat,
                    config.missed_heartbeats,
                );
                let strategy = wake_on(
                    &pool,
                    queue,
                    Duration::from_millis(config.poll_interval_ms.max(5)),
                );
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
    crate::both_queues(consume)
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
            if ctx.db.dead_letter(envelope.job_id, &why).await? {
                tracing::error!(job = %envelope.job_id, error = %why, "job dead-lettered");
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Wakes this worker's waiting spawns whenever any worker frees a slot.
pub(crate) async fn slot_notifications(ctx: Arc<Context>, pool: PgPool, done: CancellationToken) {
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

/// How `berth worker` consumes one apalis-postgres queue: each fetch takes up to as
/// many tasks as the worker runs at once (apalis's default batch of 10 capped a
/// worker at about a thousand no-op jobs a second).
/// When a consumer looks for jobs: NOTIFY wakes it the moment a job is inserted,
/// and a tick every `every` catches what NOTIFY never announces (jobs handed back,
/// retried or taken over from a dead worker).
///
/// One strategy that polls both sources until each is pending, rather than
/// apalis's `Strategy::new().stream(…).interval(…)`: that one stops at the first
/// source that is ready, and a source that has just answered ready is not waiting
/// for anything. When a notification had been taken (its job already fetched by
/// another worker) just after the tick fired, the fetch found nothing and the
/// consumer slept with no timer and no listener armed until its next heartbeat:
/// at a steady 500 jobs/s a quarter of the jobs waited ~4 s (`ops/bench queues
/// --rate 500`).
pub fn wake_on(pool: &PgPool, queue: &str, every: Duration) -> Strategy {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Strategy::new().apply(Wake {
        notices: Pubsub::new(pool.clone(), queue.to_owned()),
        tick,
        closed: false,
    })
}

struct Wake {
    notices: Pubsub,
    tick: tokio::time::Interval,
    /// The listener ended (it is not restarted: the tick goes on alone).
    closed: bool,
}

impl PollStrategy for Wake {
    fn poll_drive(&mut self, cx: &mut task::Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        let mut woken = false;
        // Every notice that has arrived: one fetch serves them all.
        while !self.closed {
            match self.notices.poll_next_unpin(cx) {
                Poll::Ready(Some(_)) => woken = true,
                Poll::Ready(None) => self.closed = true,
                Poll::Pending => break,
            }
        }
        while self.tick.poll_tick(cx).is_ready() {
            woken = true;
        }
        // Both are pending now, so both will wake this consumer again.
        if woken {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}

pub fn queue_config(
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
