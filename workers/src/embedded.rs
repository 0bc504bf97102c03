//! The consumer of the embedded store's queue (`berth up` on SQLite): takes due
//! jobs oldest first, up to `concurrency` at a time, and settles each as the
//! broker backends do: done → off the queue; an error → back after 1, 2, 4 … 60 s;
//! the last of `MAX_DELIVERIES` → dead letter; a hand-off at shutdown → back at once.

use std::{sync::Arc, time::Duration};

use schema::{SqliteStore, lite::queue::Delivery, prelude::*, queue::MAX_DELIVERIES};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    WorkerError,
    context::{Context, HandlerError},
    jetstream::{DEFERRAL, redelivery_delay},
};

/// How often the queue is looked at without a wake-up: jobs whose delay is over.
const POLL: Duration = Duration::from_millis(500);

pub async fn consume(
    ctx: Arc<Context>,
    store: SqliteStore,
    queue: &'static str,
    concurrency: usize,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let taker = format!("{}/{queue}", ctx.worker_name);
    let settling = store.clone();
    consume_with(
        store,
        queue,
        concurrency,
        taker,
        shutdown,
        move |delivery| {
            let (ctx, store) = (ctx.clone(), settling.clone());
            async move { settle(&ctx, &store, delivery).await }
        },
    )
    .await
}

/// The consumer loop with the handling of a delivery (run, then settle) left to
/// `handle`: the worker's is `settle`; a benchmark's may do nothing.
pub async fn consume_with<F, Fut>(
    store: SqliteStore,
    queue: &'static str,
    concurrency: usize,
    taker: String,
    shutdown: CancellationToken,
    handle: F,
) -> Result<(), WorkerError>
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let concurrency = concurrency.max(1);
    let permits = Arc::new(Semaphore::new(concurrency));
    let wake = store.enqueued();
    while !shutdown.is_cancelled() {
        let free = permits.available_permits();
        if free == 0 {
            tokio::select! {
                permit = permits.clone().acquire_owned() => drop(permit),
                _ = shutdown.cancelled() => break,
            }
            continue;
        }
        // Armed before looking, so that an enqueue during the look is not missed.
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let taken = match store.take(queue, free, &taker).await {
            Ok(taken) => taken,
            Err(e) => {
                tracing::warn!(queue, error = %e, "could not take jobs; trying again in 1 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
        };
        let full = taken.len() == free;
        for delivery in taken {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let handled = handle(delivery);
            tokio::spawn(async move {
                handled.await;
                drop(permit);
            });
        }
        if full {
            continue;
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    // Jobs in flight finish (or hand themselves back) before this returns; the
    // worker bounds the wait by its shutdown grace.
    let _ = permits.acquire_many(concurrency as u32).await;
    Ok(())
}

async fn settle(ctx: &Context, store: &SqliteStore, d: Delivery) {
    let job_id = d.envelope.job_id;
    let span = crate::job_span(&d.envelope);
    let result = crate::run_job(d.envelope, ctx)
        .instrument(span.clone())
        .await;
    let _entered = span.enter();
    let (delay, why) = match result {
        Ok(()) => (None, None),
        Err(HandlerError::HandOff) => (Some(Duration::ZERO), None),
        Err(HandlerError::Deferred(why)) => (Some(DEFERRAL), Some(why)),
        Err(e) if d.delivery as usize >= MAX_DELIVERIES => {
            let why = format!("gave up after {} deliveries: {e}", d.delivery);
            match ctx.db.dead_letter(job_id, &why).await {
                Ok(_) => {
                    tracing::error!(error = %why, "job dead-lettered");
                    (None, None)
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not dead-letter the job");
                    (Some(redelivery_delay(d.delivery.into())), Some(why))
                }
            }
        }
        Err(e) => (
            Some(redelivery_delay(d.delivery.into())),
            Some(e.to_string()),
        ),
    };
    // A job left taken would wait for the next start of the process: try again.
    for _ in 0..5 {
        let settled = match delay {
            None => store.ack(job_id).await,
            Some(delay) => store.hand_back(job_id, delay, why.as_deref()).await,
        };
        match settled {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "could not settle the job on the queue; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    tracing::error!("the job stays taken until Berth restarts");
}
