//! Reconciliation: the containers that carry this deployment's labels are compared
//! with the database, at start-up and periodically. A container without a live
//! server is removed; a running server whose container vanished or exited is marked
//! failed (or stopped, after a clean exit) with the reason.

use std::collections::{HashMap, HashSet};

use schema::{ServerState, prelude::*};

use crate::context::{Context, HandlerError};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub removed: usize,
    pub lost: usize,
    /// Another reconciler was running; nothing was looked at.
    pub skipped: bool,
}

pub async fn reconcile(ctx: &Context) -> Result<Report, HandlerError> {
    let Some(global) = ctx.db.try_reconcile_lock().await? else {
        return Ok(Report {
            skipped: true,
            ..Report::default()
        });
    };
    let result = reconcile_locked(ctx).await;
    global.release().await;
    result
}

async fn reconcile_locked(ctx: &Context) -> Result<Report, HandlerError> {
    let mut report = Report::default();
    ctx.db.close_stale_attempts().await?;
    let containers = ctx
        .spawner
        .list_managed()
        .await
        .map_err(|e| HandlerError::Transient(e.to_string()))?;
    let live: HashMap<i64, _> = ctx
        .db
        .live_servers()
        .await?
        .into_iter()
        .map(|s| (s.id, s))
        .collect();
    let mut seen = HashSet::new();

    for container in &containers {
        let server = container.server_id.and_then(|id| live.get(&id));
        let healthy = match server {
            // A spawn or stop is under way: its job owns the container.
            Some(s) if s.state != ServerState::Running => true,
            Some(s) => {
                container.running && s.container_id.as_deref() == Some(container.id.as_str())
            }
            None => false,
        };
        if let Some(id) = container.server_id
            && healthy
        {
            seen.insert(id);
            continue;
        }
        // Look again under the server's lock; a server being worked on is left alone.
        let lock = match container.server_id {
            Some(id) => match ctx.db.try_lock_server(id).await? {
                Some(lock) => Some(lock),
                None => {
                    // Someone is working on this server: leave it, and its server, alone.
                    seen.insert(id);
                    continue;
                }
            },
            None => None,
        };
        let now = match container.server_id {
            Some(id) => ctx.db.server_by_id(id).await?,
            None => None,
        };
        let owned = now.as_ref().is_some_and(|s| {
            s.state != ServerState::Running
                && s.state != ServerState::Stopped
                && s.state != ServerState::Failed
                || (s.state == ServerState::Running
                    && s.container_id.as_deref() == Some(container.id.as_str()))
        });
        let state_now = ctx
            .spawner
            .container_state(&container.id)
            .await
            .map_err(|e| HandlerError::Transient(e.to_string()))?;
        if let Some(server) = now.filter(|_| owned) {
            if let (ServerState::Running, Some((false, exit_code))) = (server.state, state_now) {
                let code = exit_code.unwrap_or(-1);
                let failed = code != 0;
                let why = format!("the server exited with code {code}");
                if ctx.db.mark_lost(server.id, failed, &why).await? {
                    report.lost += 1;
                    tracing::warn!(container = %container.name, %why, "reconcile: server lost");
                }
                remove(ctx, &container.id, &container.name, &mut report).await;
            } else {
                seen.insert(server.id);
            }
        } else if state_now.is_some() {
            remove(ctx, &container.id, &container.name, &mut report).await;
        }
        if let Some(lock) = lock {
            lock.release().await;
        }
    }

    for server in live
        .values()
        .filter(|s| s.state == ServerState::Running && !seen.contains(&s.id))
    {
        let Some(lock) = ctx.db.try_lock_server(server.id).await? else {
            continue;
        };
        // The listing may be older than the server: look at both again, under the lock.
        let now = ctx.db.server_by_id(server.id).await?;
        // Asked of the spawner that started it: a server of another kind than
        // this worker's is not gone because this one has no container of it.
        let spawner = match now.as_ref().map(|s| ctx.spawner_for(s)).transpose() {
            Ok(spawner) => spawner,
            Err(e) => {
                tracing::warn!(user = %server.user_name, server = %server.name, error = %e,
                    "reconcile: cannot look at a server started by another spawner; left alone");
                lock.release().await;
                continue;
            }
        };
        let container_now = match (spawner, now.as_ref().and_then(|s| s.container_id.clone())) {
            (Some(spawner), Some(id)) => match spawner.container_state(&id).await {
                Ok(state) => state,
                Err(e) if spawner.kind() == ctx.spawner.kind() => {
                    lock.release().await;
                    return Err(HandlerError::Transient(e.to_string()));
                }
                Err(e) => {
                    tracing::warn!(user = %server.user_name, server = %server.name,
                        spawner = spawner.kind(), error = %e,
                        "reconcile: the spawner that started this server does not answer; left alone");
                    lock.release().await;
                    continue;
                }
            },
            _ => None,
        };
        let vanished =
            now.is_some_and(|s| s.state == ServerState::Running) && container_now.is_none();
        if vanished
            && ctx
                .db
                .mark_lost(server.id, true, "the container vanished")
                .await?
        {
            report.lost += 1;
            tracing::warn!(user = %server.user_name, server = %server.name, "reconcile: container vanished");
        }
        lock.release().await;
    }
    if report.removed + report.lost > 0 {
        tracing::info!(removed = report.removed, lost = report.lost, "reconciled");
    }
    Ok(report)
}

async fn remove(ctx: &Context, id: &str, name: &str, report: &mut Report) {
    match ctx.spawner.remove(id).await {
        Ok(()) => {
            report.removed += 1;
            tracing::warn!(container = %name, "reconcile: removed a container without a live server");
        }
        Err(e) => tracing::warn!(container = %name, error = %e, "reconcile: could not remove"),
    }
}
