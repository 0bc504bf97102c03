//! Taking jobs from NATS JetStream: one durable pull consumer per queue, shared by
//! every worker. A worker asks for as many messages as it has free places, keeps
//! each job's message alive with in-progress acknowledgements while the job runs,
//! acknowledges it when done, hands it back with a growing delay after an error,
//! and dead-letters it (the job fails with its error) once it has used up its
//! deliveries.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;
use schema::{JobEnvelope, JobKind, nats::Broker, prelude::*};
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{WorkerError, context::Context, context::HandlerError};

/// How long one pull request waits for messages before the next is sent.
const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// Runs one queue's consumer until `shutdown` fires, then waits for the jobs it
/// took (the caller bounds that wait with the shutdown grace).
pub async fn consume(
    ctx: Arc<Context>,
    broker: Broker,
    queue: &'static str,
    concurrency: usize,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let settings = broker.settings.clone();
    let seen = ctx.clone();
    let admit = move |message: &Message| {
        let ctx = seen.clone();
        let envelope = serde_json::from_slice::<JobEnvelope>(&message.payload).ok();
        async move {
            // A spawn counts as waiting for a slot from the moment it is fetched, in
            // the order the broker hands spawns out, so a younger one whose handler
            // happens to ask first does not overtake it.
            if let Some(envelope) = envelope.filter(|e| e.kind == JobKind::Spawn)
                && let Err(e) = ctx.db.mark_fetched(envelope.job_id).await
            {
                tracing::debug!(job = %envelope.job_id, error = %e, "could not mark the spawn fetched");
            }
        }
    };
    pull_with(
        broker,
        queue,
        concurrency,
        shutdown,
        admit,
        move |message| {
            let ctx = ctx.clone();
            let settings = settings.clone();
            async move { handle(&ctx, message, settings.ack_wait, settings.max_deliver).await }
        },
    )
    .await
}

/// The pull loop under `consume`: at most `concurrency` messages of `queue` in
/// hand, each given to `handle`, which settles it. Public for the queue benchmark.
pub async fn pull<F, Fut>(
    broker: Broker,
    queue: &'static str,
    concurrency: usize,
    shutdown: CancellationToken,
    handle: F,
) -> Result<(), WorkerError>
where
    F: Fn(Message) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    pull_with(broker, queue, concurrency, shutdown, |_| async {}, handle).await
}

/// `pull`, with `admit` awaited for each message in the order they arrive, before
/// its `handle` runs beside the others.
async fn pull_with<A, AFut, F, Fut>(
    broker: Broker,
    queue: &'static str,
    concurrency: usize,
    shutdown: CancellationToken,
    admit: A,
    handle: F,
) -> Result<(), WorkerError>
where
    A: Fn(&Message) -> AFut,
    AFut: Future<Output = ()>,
    F: Fn(Message) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let places = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut jobs = JoinSet::new();
    let mut consumer = None;
    'pull: while !shutdown.is_cancelled() {
        while jobs.try_join_next().is_some() {}
        let mut permits = tokio::select! {
            permit = places.clone().acquire_owned() => permit.expect("semaphore open"),
            _ = shutdown.cancelled() => break,
        };
        let free = places.available_permits();
        if free > 0
            && let Ok(more) = places.clone().try_acquire_many_owned(free as u32)
        {
            permits.merge(more);
        }
        let pull = match &consumer {
            Some(c) => c,
            None => match broker.ensure_consumer(queue).await {
                Ok(c) => consumer.insert(c),
                Err(e) => {
                    tracing::warn!(queue, error = %e, "cannot reach the JetStream consumer; retrying in 1 s");
                    pause(&shutdown).await;
                    continue;
                }
            },
        };
        let mut batch = match pull
            .batch()
            .max_messages(permits.num_permits())
            .expires(PULL_EXPIRES)
            .messages()
            .await
        {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(queue, error = %e, "pull request failed; retrying in 1 s");
                consumer = None;
                pause(&shutdown).await;
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                next = batch.next() => next,
                _ = shutdown.cancelled() => break 'pull,
            };
            match next {
                None => break,
                Some(Ok(message)) => {
                    let permit = permits.split(1).expect("one place per requested message");
                    admit(&message).await;
                    let job = handle(message);
                    jobs.spawn(async move {
                        job.await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(queue, error = %e, "pull request ended");
                    break;
                }
            }
        }
    }
    // Messages this worker was sent but never started go back to the broker when
    // their acknowledgement time runs out; jobs in hand finish.
    while jobs.join_next().await.is_some() {}
    Ok(())
}

async fn pause(shutdown: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        _ = shutdown.cancelled() => {}
    }
}

/// Runs the job of one message and settles the message.
async fn handle(ctx: &Context, message: Message, ack_wait: Duration, max_deliver: i64) {
    let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
    let envelope: JobEnvelope = match serde_json::from_slice(&message.payload) {
        Ok(envelope) => envelope,
        Err(e) => {
            tracing::error!(error = %e, "a message that is not a Berth job; dropped");
            settle(&message, AckKind::Term).await;
            return;
        }
    };
    let span = tracing::info_span!("job", id = %envelope.job_id, kind = envelope.kind.as_str(), delivered, user = tracing::field::Empty, server = tracing::field::Empty);
    let message = Arc::new(message);
    // Signs of life three times per acknowledgement window: a long spawn (or one
    // waiting for a slot) is never handed to a second worker while this one lives.
    let keepalive = {
        let message = message.clone();
        let every = (ack_wait / 3).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %e, "in-progress acknowledgement failed");
                }
            }
        })
    };
    let result = crate::run_job(envelope, ctx).instrument(span.clone()).await;
    keepalive.abort();
    let _entered = span.enter();
    let kind = match result {
        Ok(()) => AckKind::Ack,
        Err(HandlerError::HandOff) => AckKind::Nak(None),
        Err(HandlerError::Deferred(_)) => AckKind::Nak(Some(DEFERRAL)),
        Err(e) if delivered >= max_deliver => {
            let why = format!("gave up after {delivered} deliveries: {e}");
            match ctx.db.dead_letter(envelope.job_id, &why).await {
                Ok(_) => {
                    tracing::error!(error = %why, "job dead-lettered");
                    AckKind::Term
                }
                // The database is unreachable too: the broker's advisory is the
                // last chance (see `dead_letters`).
                Err(e) => {
                    tracing::error!(error = %e, "could not dead-letter the job");
                    AckKind::Nak(None)
                }
            }
        }
        Err(_) => AckKind::Nak(Some(redelivery_delay(delivered))),
    };
    settle(&message, kind).await;
}

/// When a delivery whose job is alive elsewhere comes back.
pub(crate) const DEFERRAL: Duration = Duration::from_secs(5);

/// 1, 2, 4 … 60 seconds before the next delivery of a job that hit an error.
pub(crate) fn redelivery_delay(delivered: i64) -> Duration {
    Duration::from_secs(1u64 << delivered.clamp(1, 7).saturating_sub(1))
        .min(Duration::from_secs(60))
}

async fn settle(message: &Message, kind: AckKind) {
    // A lost acknowledgement means one more delivery, which finds the job ended.
    for _ in 0..3 {
        match message.ack_with(kind).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "acknowledgement failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Dead-letters jobs whose last delivery never ended (the worker holding it died):
/// JetStream announces them on an advisory subject; one worker (a queue group)
/// reads the job id from the stream, fails the job and removes the message.
pub async fn dead_letters(
    ctx: Arc<Context>,
    broker: Broker,
    queue: &'static str,
    done: CancellationToken,
) {
    let subject = broker.settings.max_deliveries_advisory(queue);
    loop {
        let listened = async {
            let mut advisories = broker
                .client
                .queue_subscribe(
                    subject.clone(),
                    format!("{}-dead-letters", broker.settings.stream),
                )
                .await
                .map_err(|e| e.to_string())?;
            while let Some(advisory) = advisories.next().await {
                if let Err(e) = dead_letter(&ctx, &broker, &advisory.payload).await {
                    tracing::warn!(error = %e, "could not dead-letter a job");
                }
            }
            Ok::<(), String>(())
        };
        tokio::select! {
            result = listened => {
                if let Err(e) = result {
                    tracing::warn!(queue, error = %e, "dead-letter advisories lost; listening again");
                }
            }
            _ = done.cancelled() => return,
        }
        pause(&done).await;
    }
}

/// Whether a worker is running the job right now (it holds the server's lock):
/// then the job is alive, whatever the broker counted, and finishes there.
async fn in_hand(ctx: &Context, job_id: uuid::Uuid) -> bool {
    let Ok(Some(job)) = ctx.db.get_job(job_id).await else {
        return false;
    };
    let Ok(payload) = crate::context::server_payload(&job) else {
        return false;
    };
    if job.state != schema::JobState::Running {
        return false;
    }
    match ctx.db.try_lock_server(payload.server_id).await {
        Ok(Some(lock)) => {
            lock.release().await;
            false
        }
        Ok(None) => true,
        Err(_) => false,
    }
}

#[derive(serde::Deserialize)]
struct MaxDeliveries {
    stream_seq: u64,
    deliveries: i64,
}

async fn dead_letter(ctx: &Context, broker: &Broker, payload: &[u8]) -> Result<(), String> {
    let advisory: MaxDeliveries = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let stream = broker.ensure_stream().await.map_err(|e| e.to_string())?;
    let message = match stream.get_raw_message(advisory.stream_seq).await {
        Ok(message) => message,
        // Another worker got there first, or the message was acknowledged meanwhile.
        Err(_) => return Ok(()),
    };
    if let Ok(envelope) = serde_json::from_slice::<JobEnvelope>(&message.payload)
        && !in_hand(ctx, envelope.job_id).await
    {
        let why = format!(
            "gave up after {} deliveries: the worker handling it was lost each time",
            advisory.deliveries
        );
        if ctx
            .db
            .dead_letter(envelope.job_id, &why)
            .await
            .map_err(|e| e.to_string())?
        {
            tracing::error!(job = %envelope.job_id, error = %why, "job dead-lettered");
        }
    }
    stream
        .delete_message(advisory.stream_seq)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
