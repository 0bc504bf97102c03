//! `GET …/server/progress` and `…/servers/{name}/progress`: a spawn's progress as
//! Server-Sent Events in JupyterHub's shape `{progress, message, ready?, failed?,
//! url?}`, from the request to ready or failed. Events live in Postgres, so any API
//! process streams any spawn, whichever worker and queue backend run it.

use std::{collections::VecDeque, convert::Infallible, time::Duration};

use axum::{
    Router,
    extract::State,
    response::sse::{Event, KeepAlive, Sse},
    routing::get,
};
use futures::Stream;
use schema::{ServerRow, ServerState, console::SpawnEvent, prelude::*};
use serde_json::json;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::{AppState, auth::Principal, error::ApiResult, servers::ServerPath};

/// A stream looks again this often even without a notification.
const POLL: Duration = Duration::from_secs(1);

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/users/{user}/server/progress", get(progress))
        .route("/users/{user}/servers/{name}/progress", get(progress))
}

async fn progress(
    State(state): State<AppState>,
    principal: Principal,
    ServerPath { user, server }: ServerPath,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    principal.may("servers:read", &user)?;
    let row = state.db.get_server(&user, &server).await?.ok_or_else(|| {
        crate::error::ApiError::NotFound(format!("user {user:?} has no server {server:?}"))
    })?;
    Ok(follow(state, row))
}

/// The stream of one server's spawn, for the API and the proxy's starting page.
pub(crate) fn follow(
    state: AppState,
    row: ServerRow,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    // A spawn under way is followed from its first event; otherwise the server's
    // state is the one answer (an old spawn's history would mislead).
    let job = row
        .spawn_job_id
        .filter(|_| row.state == ServerState::PendingSpawn);
    let follow = Follow {
        wake: state.progress.subscribe(),
        state,
        job,
        server: row,
        last: 0,
        pending: VecDeque::new(),
        done: false,
    };
    let stream = futures::stream::unfold(follow, |mut f| async move {
        let event = f.next().await?;
        let data = serde_json::to_string(&event).expect("events serialise");
        Some((Ok(Event::default().data(data)), f))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// One client's view of one spawn.
struct Follow {
    state: AppState,
    wake: broadcast::Receiver<Uuid>,
    server: ServerRow,
    job: Option<Uuid>,
    last: i64,
    pending: VecDeque<SpawnEvent>,
    done: bool,
}

impl Follow {
    /// The next event to send; `None` once the spawn has ended (the stream closes).
    async fn next(&mut self) -> Option<serde_json::Value> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.last = event.id;
                self.done = event.ready || event.failed;
                let mut shown = serde_json::to_value(&event).expect("events serialise");
                if event.ready {
                    shown["url"] = self.url().into();
                }
                return Some(shown);
            }
            if self.done {
                return None;
            }
            if let Some(job) = self.job
                && let Ok(events) = self.state.db.progress_after(job, self.last).await
                && !events.is_empty()
            {
                self.pending.extend(events);
                continue;
            }
            // No event says how it ended: the server's state does (a spawn that was
            // never recorded, or ended in a way that wrote no event).
            if let Some(end) = self.ended().await {
                self.done = true;
                return Some(end);
            }
            self.wait().await;
        }
    }

    async fn ended(&mut self) -> Option<serde_json::Value> {
        let fresh = self
            .state
            .db
            .server_by_id(self.server.id)
            .await
            .ok()
            .flatten();
        let Some(server) = fresh else {
            return Some(
                json!({"progress": 100, "failed": true, "message": "the server was removed"}),
            );
        };
        // A newer spawn replaced the one followed: follow that one.
        if server.spawn_job_id != self.job && server.state == ServerState::PendingSpawn {
            self.job = server.spawn_job_id;
            self.last = 0;
            return None;
        }
        let end = match server.state {
            ServerState::PendingSpawn => None,
            ServerState::Running => Some(json!({
                "progress": 100, "ready": true, "url": self.url(), "message": "server ready",
            })),
            ServerState::Failed => Some(json!({
                "progress": 100, "failed": true,
                "message": format!("spawn failed: {}", server.error.as_deref().unwrap_or("unknown error")),
            })),
            ServerState::PendingStop | ServerState::Stopped => Some(json!({
                "progress": 100, "failed": true, "message": "the server was stopped before it was ready",
            })),
        };
        self.server = server;
        end
    }

    /// Where the user reaches the server: through the proxy.
    fn url(&self) -> String {
        self.state
            .public_addresses()
            .public(&self.server.user_name, &self.server.name)
    }

    async fn wait(&mut self) {
        let Some(job) = self.job else {
            tokio::time::sleep(POLL).await;
            return;
        };
        let _ = tokio::time::timeout(POLL, async {
            loop {
                match self.wake.recv().await {
                    Ok(id) if id == job => return,
                    Ok(_) => {}
                    // Fell behind a burst: look now.
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        })
        .await;
    }
}
