//! The apalis-postgres consumers (`BERTH_QUEUE=postgres`): one per queue, rebuilt
//! under a new id when its connection fails, and the NOTIFY feed that wakes spawns
//! waiting for a slot.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{self, Poll, Waker},
    time::Duration,
};

use apalis::prelude::{
    Attempt, Backend, BoxDynError, Data, WorkerBuilder, WorkerBuilderExt, WorkerContext,
};
use apalis_core::backend::{BackendConfig, WireFormatBackend};
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
                let backend = queue_backend(
                    &pool,
                    queue,
                    config.concurrency,
                    Duration::from_secs(config.heartbeat.max(1)),
                    config.missed_heartbeats,
                    Duration::from_millis(config.poll_interval_ms.max(5)),
                );
                WorkerBuilder::new(id)
                    .backend(backend)
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
                ctx.slot_line.freed();
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

/// When a consumer looks for jobs: NOTIFY wakes it the moment a job is inserted,
/// and a tick every `every` catches what NOTIFY never announces (jobs handed back,
/// retried or taken over from a dead worker).
///
/// Both sources are polled until each is pending, rather than apalis's
/// `Strategy::new().stream(…).interval(…)`: that one stops at the first source that
/// is ready, and a source that has just answered ready is not waiting for anything.
/// When a notification had been taken (its job already fetched by another worker)
/// just after the tick fired, the fetch found nothing and the consumer slept with no
/// timer and no listener armed until its next heartbeat: at a steady 500 jobs/s a
/// quarter of the jobs waited ~4 s (`ops/bench queues --rate 500`).
fn wake_on(pool: &PgPool, queue: &str, every: Duration) -> Wake {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Wake {
        notices: Pubsub::new(pool.clone(), queue.to_owned()),
        tick,
        closed: false,
    }
}

struct Wake {
    notices: Pubsub,
    tick: tokio::time::Interval,
    /// The listener ended (it is not restarted: the tick goes on alone).
    closed: bool,
}

impl Wake {
    /// Ready when a notice or the tick came since the last call; pending, with both
    /// armed to wake the caller, otherwise.
    fn poll(&mut self, cx: &mut task::Context<'_>) -> Poll<()> {
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
        if woken {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// A queue backend that fetches only when `Wake` says so or its own fetch under
/// way needs polling.
///
/// apalis polls a consumer's jobs inside the consumer's task, and after a fetch
/// that found nothing its Postgres backend fetches again the next time that task is
/// woken, whatever woke it; apalis's `PollWith` drives its strategy but does not
/// hold the fetch back. A spawn probing its server every 100 ms woke it each time,
/// and a connection going back to the pool woke it with the fetch's own stale
/// waker: an idle worker made about 140 fetches a second, and a 50-spawn Docker
/// storm about 480, the database's largest load (`ops/bench/storm`, measured with
/// `pg_stat_statements`).
///
/// The backend is polled with a waker of its own, new at every poll, so a wake-up is
/// its fetch's progress only when it comes from the latest poll's waker (a future
/// that answers pending has registered the waker of that poll); older wakers are
/// stale. After a task it is polled again: its batch may hold more, or the next
/// fetch may. A notice that arrives while a fetch is under way may find that fetch
/// blind to its job; the next notice or tick fetches it.
pub struct Gated<B> {
    backend: B,
    wake: Wake,
    /// The waker the backend was last polled with.
    latest: Option<Arc<Progress>>,
    /// The backend's last answer was a task.
    more: bool,
}

impl<B> Gated<B> {
    fn new(backend: B, wake: Wake) -> Self {
        Self {
            backend,
            wake,
            latest: None,
            more: true,
        }
    }
}

/// Wakes the consumer and records that it did.
struct Progress {
    woke: AtomicBool,
    consumer: Waker,
}

impl std::task::Wake for Progress {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woke.store(true, Ordering::Release);
        self.consumer.wake_by_ref();
    }
}

impl<B: Backend> Backend for Gated<B> {
    type Task = B::Task;
    type Error = B::Error;

    fn poll_ready(
        &mut self,
        cx: &mut task::Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        self.backend.poll_ready(cx, worker)
    }

    fn poll_next(
        &mut self,
        cx: &mut task::Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        let asked = self.wake.poll(cx).is_ready();
        let progressed = self
            .latest
            .as_ref()
            .is_some_and(|p| p.woke.load(Ordering::Acquire));
        if !(asked || progressed || self.more) {
            return Poll::Pending;
        }
        let progress = Arc::new(Progress {
            woke: AtomicBool::new(false),
            consumer: cx.waker().clone(),
        });
        let waker = Waker::from(progress.clone());
        self.latest = Some(progress);
        let answer = self
            .backend
            .poll_next(&mut task::Context::from_waker(&waker), worker);
        self.more = matches!(answer, Poll::Ready(Some(_)));
        answer
    }

    fn poll_close(
        &mut self,
        cx: &mut task::Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        self.backend.poll_close(cx, worker)
    }
}

impl<B: BackendConfig> BackendConfig for Gated<B> {
    type Args = B::Args;
    type Id = B::Id;
    type Kind = B::Kind;
    type Config = B::Config;
    type Layer = B::Layer;

    fn config(&self) -> &Self::Config {
        self.backend.config()
    }

    fn middleware(&mut self, worker: &mut WorkerContext) -> Self::Layer {
        self.backend.middleware(worker)
    }
}

impl<B: WireFormatBackend> WireFormatBackend for Gated<B> {
    type Compact = B::Compact;
    type Codec = B::Codec;

    fn codec(&self) -> &Self::Codec {
        self.backend.codec()
    }
}

/// The backend `berth worker` consumes an apalis-postgres queue from: each fetch
/// takes up to as many tasks as the worker runs at once (apalis's default batch of
/// 10 capped a worker at about a thousand no-op jobs a second), and fetches happen
/// when NOTIFY or a tick every `poll` asks (`Gated`, `wake_on`).
pub fn queue_backend(
    pool: &PgPool,
    queue: &str,
    concurrency: usize,
    heartbeat: Duration,
    missed_heartbeats: usize,
    poll: Duration,
) -> Gated<PostgresStorage<JobEnvelope>> {
    let config = apalis_postgres::Config::default()
        .queue(queue)
        .batch_size(concurrency.max(1))
        .heartbeat_interval(heartbeat)
        .missed_heartbeats(missed_heartbeats.max(1));
    Gated::new(
        PostgresStorage::new(pool).with_config(config),
        wake_on(pool, queue, poll),
    )
}
