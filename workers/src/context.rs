//! What every job handler gets.

use std::sync::Arc;

use schema::{
    JobOutcome, JobRow, ServerName, ServerRow, ServerState, Store, StoreError, UserName,
    jobs::ServerJob,
};

use crate::spawner::Spawner;

pub struct Context {
    pub store: Arc<dyn Store>,
    pub spawner: Arc<dyn Spawner>,
    pub worker_name: String,
}

/// Names in rows were validated before they were written; a row that fails here
/// was edited by hand, and the job fails with that said.
pub fn names(user: &str, server: &str) -> Result<(UserName, ServerName), String> {
    let user = UserName::parse(user).map_err(|e| format!("stored user name: {e}"))?;
    let server = if server.is_empty() {
        ServerName::default_server()
    } else {
        ServerName::parse(server).map_err(|e| format!("stored server name: {e}"))?
    };
    Ok((user, server))
}

/// An error after which the queue hands the job out again.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Transient(String),
}

/// A handler's result: how the job ended, or an error worth another delivery.
pub type HandlerResult = Result<schema::JobOutcome, HandlerError>;

/// The server a spawn or stop job is about, read under its lock.
pub struct Claimed {
    pub server: ServerRow,
    pub user: UserName,
    pub name: ServerName,
}

/// Takes the lock of the job's server and runs `act` if the server is still in
/// `expected` on behalf of this very job; otherwise the job is moot and cancelled.
/// One worker at a time acts on a server: a stop waits here until a spawn is done
/// or has noticed that it is no longer wanted.
pub async fn with_claimed_server<F, Fut>(
    ctx: &Context,
    job: &JobRow,
    expected: ServerState,
    act: F,
) -> HandlerResult
where
    F: FnOnce(Claimed) -> Fut,
    Fut: Future<Output = HandlerResult>,
{
    let payload: ServerJob = match serde_json::from_value(job.payload.clone()) {
        Ok(p) => p,
        Err(e) => {
            return Ok(JobOutcome::Failed(format!(
                "malformed {} payload: {e}",
                job.kind
            )));
        }
    };
    let lock = ctx.store.lock_server(payload.server_id).await?;
    let outcome = match claim(ctx, job, payload.server_id, expected).await {
        Ok(Ok(claimed)) => act(claimed).await,
        Ok(Err(moot)) => Ok(moot),
        Err(e) => Err(e),
    };
    lock.release().await;
    outcome
}

async fn claim(
    ctx: &Context,
    job: &JobRow,
    server_id: i64,
    expected: ServerState,
) -> Result<Result<Claimed, JobOutcome>, HandlerError> {
    let Some(server) = ctx.store.server_by_id(server_id).await? else {
        return Ok(Err(JobOutcome::Cancelled(
            "the server no longer exists".into(),
        )));
    };
    let owner = match expected {
        ServerState::PendingStop => server.stop_job_id,
        _ => server.spawn_job_id,
    };
    if server.state() != expected || owner != Some(job.id) {
        return Ok(Err(JobOutcome::Cancelled(format!(
            "the server is {} now; this {} is no longer wanted",
            server.state, job.kind
        ))));
    }
    Ok(match names(&server.user_name, &server.name) {
        Ok((user, name)) => Ok(Claimed { server, user, name }),
        Err(e) => Err(JobOutcome::Failed(e)),
    })
}
