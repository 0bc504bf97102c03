//! The cleanup job: stop every server of a user, remove the volume, delete the user.

use schema::{JobOutcome, JobRow, UserName, jobs::CleanupJob, prelude::*};

use crate::context::{Context, HandlerError, HandlerResult, names};

pub async fn run(ctx: &Context, job: &JobRow) -> Result<(), HandlerError> {
    let Some(job) = ctx.db.begin_job(job.id, &ctx.worker_name).await? else {
        return Ok(());
    };
    let outcome = cleanup(ctx, &job).await?;
    if let JobOutcome::Failed(why) = &outcome {
        tracing::warn!(job = %job.id, error = %why, "cleanup failed");
    }
    ctx.db.finish_job(job.id, &outcome).await?;
    Ok(())
}

async fn cleanup(ctx: &Context, job: &JobRow) -> HandlerResult {
    let payload: CleanupJob = match serde_json::from_value(job.payload.clone()) {
        Ok(p) => p,
        Err(e) => {
            return Ok(JobOutcome::Failed(format!(
                "malformed cleanup payload: {e}"
            )));
        }
    };
    let user = match UserName::parse(&job.user_name) {
        Ok(u) => u,
        Err(e) => return Ok(JobOutcome::Failed(format!("stored user name: {e}"))),
    };
    // Every spawner that started one of the user's servers, and this worker's.
    let mut kinds = vec![None];
    for server in ctx.db.servers_of_user(payload.user_id).await? {
        if !kinds.contains(&server.spawner) {
            kinds.push(server.spawner.clone());
        }
        let lock = ctx.db.lock_server(server.id).await?;
        let stopped = match (
            names(&server.user_name, &server.name),
            ctx.spawner_for(&server),
        ) {
            (Ok((user, name)), Ok(spawner)) => ctx
                .with_retries(job, || spawner.stop(&user, &name))
                .await
                .map(|r| r.map_err(|e| e.to_string())),
            (Err(e), _) => Ok(Err(e)),
            (_, Err(e)) => Ok(Err(e.to_string())),
        };
        let marked = match stopped {
            Ok(Ok(())) => ctx.db.mark_stopped(server.id, None).await.map(|_| ()),
            Ok(Err(e)) => {
                lock.release().await;
                return Ok(JobOutcome::Failed(format!(
                    "stopping server {:?}: {e}",
                    server.name
                )));
            }
            Err(e) => {
                lock.release().await;
                return Err(e);
            }
        };
        lock.release().await;
        marked?;
    }
    for kind in kinds {
        let removed = match ctx.spawner_of(kind.as_deref()) {
            Ok(spawner) => ctx.with_retries(job, || spawner.remove_user(&user)).await?,
            Err(e) => Err(e),
        };
        if let Err(e) = removed {
            return Ok(JobOutcome::Failed(format!(
                "removing the containers and volume of {user}: {e}"
            )));
        }
    }
    if !ctx.db.delete_user(payload.user_id, job.id).await? {
        return Ok(JobOutcome::Cancelled(
            "the user is no longer being deleted by this job".into(),
        ));
    }
    tracing::info!(user = %user, "user removed");
    Ok(JobOutcome::Succeeded)
}
