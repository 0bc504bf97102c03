//! The stop job: stop and remove a server's container; the user's volume stays.

use schema::{JobOutcome, JobRow, ServerState, prelude::*};

use crate::context::{Claimed, Context, HandlerError, HandlerResult, with_claimed_server};

pub async fn run(ctx: &Context, job: &JobRow) -> Result<(), HandlerError> {
    with_claimed_server(ctx, job, ServerState::PendingStop, |claimed| {
        stop(ctx, job, claimed)
    })
    .await
}

async fn stop(ctx: &Context, job: &JobRow, claimed: Claimed) -> HandlerResult {
    let Claimed { server, user, name } = claimed;
    // With the spawner that started it, whichever this worker runs.
    let stopped = match ctx.spawner_for(&server) {
        Ok(spawner) => ctx.with_retries(job, || spawner.stop(&user, &name)).await?,
        Err(e) => Err(e),
    };
    if let Err(e) = stopped {
        // Left in pending_stop with the error on the job; the reconciler or a new
        // stop request finishes the work once the engine answers again.
        return Ok(JobOutcome::Failed(format!(
            "stopping {}: {e}",
            schema::container_name(&user, &name)
        )));
    }
    ctx.db.mark_stopped(server.id, Some(job.id)).await?;
    tracing::info!(user = %user, server = %name, "server stopped");
    Ok(JobOutcome::Succeeded)
}
