//! `GET …/server/progress` and `…/servers/{name}/progress`: a spawn's progress as
//! Server-Sent Events in JupyterHub's shape `{progress, message, ready?, failed?,
//! url?}`, from the request to ready or failed. Events live in Postgres, so any API
//! process streams any spawn, whichever worker and queue backend run it.

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    extract::State,
    http::HeaderMap,
    response::sse::{Event, KeepAlive, Sse},
};
use futures::{Stream, future::BoxFuture};
use schema::{ServerRow, ServerState, UserName, console::SpawnEvent, prelude::*};
use serde::Serialize;
use tokio::{sync::broadcast, time::Instant};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    AppState,
    auth::Principal,
    error::{ApiError, ApiResult},
    openapi::{Errors, ServerParams, UserParam},
    servers::ServerPath,
};

/// A stream looks again this often even without a notification.
const POLL: Duration = Duration::from_secs(1);

/// A stream checks this often that its caller may still follow it (not logged
/// out, not deactivated, token not revoked); then it ends.
const RECHECK: Duration = Duration::from_secs(5);

/// Whether the caller that opened a stream still may follow it.
pub(crate) type StillAllowed = Box<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

/// The progress streams open in this process, per caller: each holds a
/// connection and a database poll, so one caller may open only
/// `BERTH_PROGRESS_STREAMS_PER_USER` of them.
#[derive(Default)]
pub struct Streams {
    open: Mutex<HashMap<String, usize>>,
}

/// One open stream of a caller; closing the stream gives it back.
pub(crate) struct Slot {
    streams: Arc<Streams>,
    caller: String,
}

impl Streams {
    pub(crate) fn take(self: &Arc<Self>, caller: String, most: usize) -> ApiResult<Slot> {
        let mut open = self.open.lock().expect("stream counts");
        let count = open.entry(caller.clone()).or_default();
        if *count >= most {
            return Err(ApiError::TooManyRequests {
                message: format!(
                    "{most} progress streams are open for you already; close one first"
                ),
                retry_after: Some(RECHECK.as_secs() as i64),
            });
        }
        *count += 1;
        Ok(Slot {
            streams: self.clone(),
            caller,
        })
    }

    /// Streams open for `caller` (for tests and metrics).
    pub fn open_for(&self, caller: &str) -> usize {
        let open = self.open.lock().expect("stream counts");
        open.get(caller).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.streams.open.lock().expect("stream counts");
        if let Some(count) = open.get_mut(&self.caller) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.caller);
            }
        }
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(progress_default))
        .routes(routes!(progress))
}

/// The default server's spawn progress, as Server-Sent Events until it is ready
/// or failed: each `data:` is `{progress, message, ready?, failed?, url?}`.
#[utoipa::path(get, path = "/users/{user}/server/progress", tag = "servers",
    params(UserParam),
    responses((status = 200, description = "An event stream", content_type = "text/event-stream",
        body = ProgressEvent), Errors))]
async fn progress_default(
    state: State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    path: ServerPath,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    progress(state, principal, headers, path).await
}

/// A named server's spawn progress, as Server-Sent Events until it is ready or
/// failed: each `data:` is `{progress, message, ready?, failed?, url?}`.
#[utoipa::path(get, path = "/users/{user}/servers/{name}/progress", tag = "servers",
    params(ServerParams),
    responses((status = 200, description = "An event stream", content_type = "text/event-stream",
        body = ProgressEvent), Errors))]
async fn progress(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    ServerPath { user, server }: ServerPath,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    principal.may("servers:read", &user)?;
    let row = state
        .db
        .get_server(&user, &server)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("user {user:?} has no server {server:?}")))?;
    let slot = state.open_stream(principal.actor())?;
    let still = {
        let state = state.clone();
        Box::new(move || -> BoxFuture<'static, bool> {
            let (state, headers, user) = (state.clone(), headers.clone(), user.clone());
            Box::pin(async move { may_follow(&state, &headers, &user).await })
        })
    };
    Ok(follow(state, row, slot, still))
}

/// Whether the bearer in `headers` still may read `user`'s servers; a database
/// that does not answer is not a reason to end a stream.
async fn may_follow(state: &AppState, headers: &HeaderMap, user: &UserName) -> bool {
    let Some(token) = crate::auth::bearer_in(headers) else {
        return false;
    };
    match Principal::from_token(state, token).await {
        Ok(principal) => principal.may("servers:read", user).is_ok(),
        Err(ApiError::Unauthorized(_)) => false,
        Err(_) => true,
    }
}

impl AppState {
    /// A slot for one more progress stream of `caller`, or 429.
    pub(crate) fn open_stream(&self, caller: String) -> ApiResult<Slot> {
        self.streams
            .take(caller, self.config.progress_streams_per_user)
    }
}

/// The stream of one server's spawn, for the API and the proxy's starting page;
/// it ends when the spawn does, or when `still` says its caller may no longer
/// follow it (logged out, deactivated, token revoked).
pub(crate) fn follow(
    state: AppState,
    row: ServerRow,
    slot: Slot,
    still: StillAllowed,
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
        still,
        checked: Instant::now(),
        _slot: slot,
    };
    let stream = futures::stream::unfold(follow, |mut f| async move {
        let event = f.next().await?;
        let data = serde_json::to_string(&event).expect("events serialise");
        Some((Ok(Event::default().data(data)), f))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// One event of a spawn's progress, JupyterHub's shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct Progress {
    /// 0 to 100.
    progress: i16,
    message: String,
    /// The last event of a spawn that succeeded.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ready: bool,
    /// The last event of a spawn that did not.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    failed: bool,
    /// Where the user reaches the server, once it is ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
}

impl Progress {
    fn failed(message: String) -> Self {
        Self {
            progress: 100,
            message,
            ready: false,
            failed: true,
            url: None,
        }
    }
}

/// One Server-Sent Event of a progress stream.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ProgressEvent {
    /// A [`Progress`] as JSON.
    #[schema(content_media_type = "application/json")]
    data: String,
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
    still: StillAllowed,
    checked: Instant,
    _slot: Slot,
}

impl Follow {
    /// The next event to send; `None` once the spawn has ended (the stream closes).
    async fn next(&mut self) -> Option<Progress> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.last = event.id;
                self.done = event.ready || event.failed;
                return Some(Progress {
                    url: if event.ready {
                        Some(self.url())
                    } else {
                        event.url
                    },
                    progress: event.progress,
                    message: event.message,
                    ready: event.ready,
                    failed: event.failed,
                });
            }
            if self.done {
                return None;
            }
            if self.checked.elapsed() >= RECHECK {
                if !(self.still)().await {
                    return None;
                }
                self.checked = Instant::now();
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

    async fn ended(&mut self) -> Option<Progress> {
        let fresh = self
            .state
            .db
            .server_by_id(self.server.id)
            .await
            .ok()
            .flatten();
        let Some(server) = fresh else {
            return Some(Progress::failed("the server was removed".into()));
        };
        // A newer spawn replaced the one followed: follow that one.
        if server.spawn_job_id != self.job && server.state == ServerState::PendingSpawn {
            self.job = server.spawn_job_id;
            self.last = 0;
            return None;
        }
        let end = match server.state {
            ServerState::PendingSpawn => None,
            ServerState::Running => Some(Progress {
                progress: 100,
                message: "server ready".into(),
                ready: true,
                failed: false,
                url: Some(self.url()),
            }),
            ServerState::Failed => Some(Progress::failed(format!(
                "spawn failed: {}",
                server.error.as_deref().unwrap_or("unknown error")
            ))),
            ServerState::PendingStop | ServerState::Stopped => Some(Progress::failed(
                "the server was stopped before it was ready".into(),
            )),
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
