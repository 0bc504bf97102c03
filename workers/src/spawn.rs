//! The spawn job: start a server's container and wait until it answers.

use rand::RngCore;
use schema::{JobOutcome, JobRow, Running, ServerState};
use sha2::{Digest, Sha256};

use crate::{
    context::{Claimed, Context, HandlerResult, with_claimed_server},
    spawner::{SpawnError, SpawnSpec, StillWanted},
};

pub async fn run(ctx: &Context, job: &JobRow) -> HandlerResult {
    with_claimed_server(ctx, job, ServerState::PendingSpawn, |claimed| {
        spawn(ctx, job, claimed)
    })
    .await
}

async fn spawn(ctx: &Context, job: &JobRow, claimed: Claimed) -> HandlerResult {
    let Claimed {
        server,
        user,
        name: server_name,
    } = claimed;
    let server_id = server.id;
    let token = new_token();
    let spec = SpawnSpec {
        server_id,
        job_id: job.id,
        user: user.clone(),
        server: server_name.clone(),
        image: server.image.clone(),
        token: token.clone(),
    };
    let store = ctx.store.clone();
    let job_id = job.id;
    let still_wanted: StillWanted<'_> = Box::new(move || {
        let store = store.clone();
        Box::pin(async move {
            match store.server_by_id(server_id).await {
                Ok(Some(s)) => {
                    s.state() == ServerState::PendingSpawn && s.spawn_job_id == Some(job_id)
                }
                Ok(None) => false,
                // The database is unreachable for a moment: keep going, the final
                // conditional update decides.
                Err(_) => true,
            }
        })
    });
    match ctx.spawner.spawn(&spec, still_wanted).await {
        Ok(spawned) => {
            let running = Running {
                server_id,
                job_id: job.id,
                container_id: spawned.container_id,
                url: spawned.url,
                token_hash: hash_token(&token),
            };
            if ctx.store.mark_running(&running).await? {
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
            ctx.store
                .mark_spawn_failed(server_id, job.id, &message)
                .await?;
            Ok(JobOutcome::Failed(message))
        }
    }
}

/// A fresh 256-bit token for the server (`bs_` marks server tokens to the API);
/// only its hash is stored.
fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("bs_{}", hex::encode(bytes))
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}
