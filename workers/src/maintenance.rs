//! The scheduler's jobs: culling, session expiry and archiving. Each runs once per
//! tick on whichever worker takes it, and keeps what it did on the job (`result`).

use chrono::{Duration, Utc};
use schema::{
    JobKind, JobOutcome, JobRow, ServerName, UserName,
    jobs::{ArchiveJob, CullJob},
    maintenance::ArchiveTable,
};
use serde_json::{Value, json};

use schema::prelude::*;

use crate::context::{Context, HandlerError};

pub async fn run(ctx: &Context, job: &JobRow, kind: JobKind) -> Result<(), HandlerError> {
    let Some(job) = ctx.db.begin_job(job.id, &ctx.worker_name).await? else {
        return Ok(());
    };
    let done = match kind {
        JobKind::Cull => cull(ctx, &job).await,
        JobKind::ExpireSessions => Ok(Ok(
            serde_json::to_value(ctx.db.expire_sessions().await?).expect("serialises")
        )),
        JobKind::Archive => archive(ctx, &job).await,
        other => Ok(Err(format!("{} is not a maintenance job", other.as_str()))),
    }?;
    let outcome = match done {
        Ok(result) => {
            tracing::info!(job = %job.id, kind = kind.as_str(), %result, "maintenance done");
            ctx.db.record_result(job.id, &result).await?;
            JobOutcome::Succeeded
        }
        Err(why) => JobOutcome::Failed(why),
    };
    ctx.db.finish_job(job.id, &outcome).await?;
    Ok(())
}

fn payload<T: serde::de::DeserializeOwned>(job: &JobRow) -> Result<T, String> {
    serde_json::from_value(job.payload.clone())
        .map_err(|e| format!("malformed {} payload: {e}", job.kind))
}

/// Stops idle servers, warns servers nearing their maximum age, and stops those
/// past it whose warning is old enough. Pending servers are never touched: only
/// `running` ones are read, and the stop request itself refuses anything else.
async fn cull(ctx: &Context, job: &JobRow) -> Result<Result<Value, String>, HandlerError> {
    let settings: CullJob = match payload(job) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    let now = Utc::now();
    // Each server by its own timeouts: its profile's, else the scheduler's.
    let idle = ctx
        .db
        .idle_servers_by_timeout(now, settings.idle_timeout_secs, settings.exempt_admins)
        .await?;
    let stopped_idle = stop_all(ctx, &idle, "idle").await?;
    let warning = settings.max_age_warning_secs.max(0);
    let warned = ctx
        .db
        .warn_old_servers(now, settings.max_age_secs, warning, settings.exempt_admins)
        .await?;
    let old = ctx
        .db
        .expired_servers(now, settings.max_age_secs, warning, settings.exempt_admins)
        .await?;
    let stopped_old = stop_all(ctx, &old, "past its maximum age").await?;
    Ok(Ok(json!({
        "stopped_idle": stopped_idle,
        "warned": warned,
        "stopped_max_age": stopped_old,
    })))
}

async fn stop_all(
    ctx: &Context,
    servers: &[schema::ServerRow],
    why: &str,
) -> Result<usize, HandlerError> {
    let mut stopped = 0;
    for server in servers {
        let (Ok(user), Ok(name)) = (
            UserName::parse(&server.user_name),
            if server.name.is_empty() {
                Ok(ServerName::default_server())
            } else {
                ServerName::parse(&server.name)
            },
        ) else {
            continue;
        };
        if let schema::StopOutcome::Enqueued(_) = ctx.db.request_stop(&user, &name).await? {
            tracing::info!(user = %user, server = %name, why, "culling server");
            stopped += 1;
        }
    }
    Ok(stopped)
}

async fn archive(ctx: &Context, job: &JobRow) -> Result<Result<Value, String>, HandlerError> {
    let settings: ArchiveJob = match payload(job) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    let before = Utc::now() - Duration::days(settings.after_days.max(0));
    let dir = std::path::Path::new(&settings.dir);
    let mut result = serde_json::Map::new();
    for table in ArchiveTable::ALL {
        match ctx.db.archive(table, before, dir).await {
            Ok(n) => {
                result.insert(table.as_str().into(), n.into());
            }
            Err(schema::StoreError::Io(e)) => {
                return Ok(Err(format!("archiving {}: {e}", table.as_str())));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let purged = ctx.db.purge_queue(before).await?;
    result.insert("queue_purged".into(), purged.into());
    Ok(Ok(Value::Object(result)))
}
