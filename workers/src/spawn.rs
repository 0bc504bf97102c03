//! The spawn job: wait for a global spawn slot, start the server's container and
//! wait until it answers.

use std::time::Duration;

use rand::RngCore;
use schema::{
    JobOutcome, JobRow, Running, ServerState, console::ProgressStep, platform::SlotAnswer,
    prelude::*,
};
use sha2::{Digest, Sha256};

use crate::{
    context::{
        Claimed, Context, HandlerError, HandlerResult, server_payload, still_open,
        with_claimed_server,
    },
    spawner::{SpawnError, SpawnSpec, StillWanted},
};

pub async fn run(ctx: &Context, job: &JobRow) -> Result<(), HandlerError> {
    let server_id = match server_payload(job) {
        Ok(p) => p.server_id,
        Err(outcome) => return Ok(ctx.db.finish_job(job.id, &outcome).await?),
    };
    // Over the concurrent-spawn limit a spawn waits here, neither failed nor counted
    // as an attempt, and takes the first slot that frees once no older spawn waits.
    let delivery = uuid::Uuid::new_v4();
    let mut told_waiting = false;
    // Left (dropped) once it has a slot or gives up: the next waiter asks then.
    let place = ctx.slot_line.join(job.created_at, job.id);
    let slot = loop {
        // A job already `running` was begun under the server's lock: either its
        // worker still holds that lock (this is a second delivery: come back later
        // rather than take a slot for nothing) or it died (the lock is free: take
        // over). Asked on every try, since the other delivery may begin meanwhile.
        match ctx.db.get_job(job.id).await? {
            Some(current) if current.state == schema::JobState::Running => {
                if let Some(lock) = ctx.db.try_lock_server(server_id).await? {
                    lock.release().await;
                } else {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return Err(HandlerError::Deferred(
                        "another worker is running this spawn; delivery deferred".into(),
                    ));
                }
            }
            Some(current) if still_open(&current) => {}
            // Done elsewhere meanwhile: nothing left to do.
            _ => return Ok(()),
        }
        if !still_wanted(ctx, job, server_id).await? {
            // Moot before it started (a stop won): the shared steps record why.
            return with_claimed_server(ctx, job, ServerState::PendingSpawn, |c| {
                spawn(ctx, job, c)
            })
            .await;
        }
        let limit = ctx.limits().await?.concurrent_spawn_limit;
        match ctx
            .db
            .try_spawn_slot(job.id, job.created_at, limit, &ctx.worker_name, delivery)
            .await?
        {
            SlotAnswer::Granted(slot) => break slot,
            SlotAnswer::Wait if !told_waiting => {
                told_waiting = true;
                let step = ProgressStep::at(
                    10,
                    format!("waiting for a free spawn slot ({limit} spawns run at once)"),
                );
                note_progress(ctx, job, &step).await;
            }
            SlotAnswer::Wait => {}
            SlotAnswer::Duplicate => {
                // Another delivery waits for this job: come back later, in case it dies.
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Err(HandlerError::Deferred(
                    "another delivery of this spawn is waiting for a slot; deferred".into(),
                ));
            }
        }
        tokio::select! {
            _ = place.next_turn() => {}
            _ = ctx.shutdown.cancelled() => return Err(HandlerError::HandOff),
        }
    };
    drop(place);
    tracing::debug!(job = %job.id, slot = slot.slot(), "spawn slot taken");
    let result =
        with_claimed_server(ctx, job, ServerState::PendingSpawn, |c| spawn(ctx, job, c)).await;
    slot.release().await;
    result
}

/// Progress is for watching: a step that cannot be written is logged, and the
/// spawn goes on (failing the delivery for it would run the spawn twice).
async fn note_progress(ctx: &Context, job: &JobRow, step: &ProgressStep) {
    if let Err(e) = ctx.db.record_progress(job.id, step).await {
        tracing::warn!(job = %job.id, error = %e, "could not record spawn progress");
    }
}

async fn still_wanted(ctx: &Context, job: &JobRow, server_id: i64) -> Result<bool, HandlerError> {
    Ok(ctx
        .db
        .server_by_id(server_id)
        .await?
        .is_some_and(|s| s.state == ServerState::PendingSpawn && s.spawn_job_id == Some(job.id)))
}

async fn spawn(ctx: &Context, job: &JobRow, claimed: Claimed) -> HandlerResult {
    let Claimed {
        server,
        user,
        name: server_name,
    } = claimed;
    let server_id = server.id;
    // The API admits exactly; this catches a limit an admin lowered since.
    let limit = ctx.limits().await?.active_server_limit;
    if !ctx.db.within_active_limit(server_id, limit).await? {
        let message = format!("the platform is full: the active-server limit is {limit}");
        ctx.db
            .mark_spawn_failed(server_id, job.id, &message)
            .await?;
        return Ok(JobOutcome::Failed(message));
    }
    note_progress(
        ctx,
        job,
        &ProgressStep::at(20, "spawn slot taken; starting"),
    )
    .await;
    let token = new_token("bs_");
    let spec = SpawnSpec {
        server_id,
        job_id: job.id,
        user: user.clone(),
        server: server_name.clone(),
        image: server.image.clone(),
        token: token.clone(),
        proxy_token: new_token("bp_"),
        profile: server.profile_definition(),
    };
    // Steps go out in order through one writer; it drains before the outcome is recorded.
    let (steps, mut written) = tokio::sync::mpsc::unbounded_channel::<(i16, String)>();
    let writer = {
        let console = ctx.db.clone();
        let job_id = job.id;
        tokio::spawn(async move {
            while let Some((progress, message)) = written.recv().await {
                let step = ProgressStep::at(progress, message);
                if let Err(e) = console.record_progress(job_id, &step).await {
                    tracing::warn!(job = %job_id, error = %e, "could not record spawn progress");
                }
            }
        })
    };
    let report = move |progress: i16, message: String| {
        let _ = steps.send((progress, message));
    };
    let attempt = || {
        let store = ctx.db.clone();
        let job_id = job.id;
        let still_wanted: StillWanted<'_> = Box::new(move || {
            let store = store.clone();
            Box::pin(async move {
                match store.server_by_id(server_id).await {
                    Ok(Some(s)) => {
                        s.state == ServerState::PendingSpawn && s.spawn_job_id == Some(job_id)
                    }
                    Ok(None) => false,
                    // The database is unreachable for a moment: keep going, the final
                    // conditional update decides.
                    Err(_) => true,
                }
            })
        });
        ctx.spawner.spawn(&spec, still_wanted, &report)
    };
    let result = ctx.with_retries(job, attempt).await;
    drop(report);
    let _ = writer.await;
    match result? {
        Ok(spawned) => {
            let running = Running {
                server_id,
                job_id: job.id,
                container_id: spawned.container_id,
                url: spawned.url,
                token_hash: hash_token(&token),
                proxy_token: spec.proxy_token.clone(),
                mem_limit: spawned.mem_limit,
                cpu_limit: spawned.cpu_limit.map(|c| c as f32),
                spawner: ctx.spawner.kind().to_owned(),
            };
            if ctx.db.mark_running(&running).await? {
                tracing::info!(user = %user, server = %server_name, "server running");
                return Ok(JobOutcome::Succeeded);
            }
            // A stop won the race after the server became ready: no container survives.
            if let Err(e) = ctx.spawner.stop(&user, &server_name).await {
                tracing::warn!(user = %user, server = %server_name, error = %e, "could not remove an unwanted server");
            }
            Ok(JobOutcome::Cancelled(
                "a stop was requested while the server started".into(),
            ))
        }
        Err(SpawnError::Abandoned) => Ok(JobOutcome::Cancelled(SpawnError::Abandoned.to_string())),
        Err(e) => {
            let message = e.to_string();
            tracing::warn!(user = %user, server = %server_name, error = %message, "spawn failed");
            ctx.db
                .mark_spawn_failed(server_id, job.id, &message)
                .await?;
            Ok(JobOutcome::Failed(message))
        }
    }
}

/// A fresh 256-bit token: the server's own (`bs_` marks server tokens to the API;
/// only its hash is stored) or the proxy's for the server (`bp_`).
fn new_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}
