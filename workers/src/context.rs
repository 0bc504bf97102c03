//! What every job handler gets, and the steps all server jobs share.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicI32, Ordering},
    },
    time::{Duration, Instant},
};

use schema::{
    Db, JobOutcome, JobRow, Limits, ServerName, ServerRow, ServerState, StoreError, UserName,
    jobs::ServerJob, prelude::*,
};
use tokio_util::sync::CancellationToken;

use crate::spawner::{SpawnError, Spawner};

/// Makes the spawner of another kind (`docker`, `process`) than this worker's,
/// for servers that one started.
pub type OtherSpawner = Box<dyn Fn(&str) -> Result<Arc<dyn Spawner>, SpawnError> + Send + Sync>;

pub struct Context {
    /// The store, on whichever database this Berth runs.
    pub db: Arc<Db>,
    /// This worker's spawner: every spawn it runs, and the containers it lists.
    pub spawner: Arc<dyn Spawner>,
    /// Spawners of other kinds, made when a server started by one is met.
    other_spawner: OtherSpawner,
    others: Mutex<Vec<Arc<dyn Spawner>>>,
    pub worker_name: String,
    /// Tries of a job whose failures are transient, before it fails.
    pub max_attempts: u32,
    /// Fires when the worker shuts down: waiting jobs are handed back.
    pub shutdown: CancellationToken,
    pub in_flight: AtomicI32,
    /// This worker's spawns waiting for a slot, told when any worker frees one.
    pub slot_line: Arc<crate::slot_line::SlotLine>,
    limits_cache: Mutex<Option<(Instant, Limits)>>,
}

/// How long a worker trusts the limits it read.
const LIMITS_TTL: Duration = Duration::from_secs(1);

impl Context {
    pub fn new(
        db: Arc<Db>,
        spawner: Arc<dyn Spawner>,
        other_spawner: OtherSpawner,
        worker_name: String,
        max_attempts: u32,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            db,
            spawner,
            other_spawner,
            others: Mutex::new(vec![]),
            worker_name,
            max_attempts,
            shutdown,
            in_flight: AtomicI32::new(0),
            slot_line: Arc::default(),
            limits_cache: Mutex::new(None),
        }
    }

    /// The spawner that started `server`: a server started by another kind than
    /// this worker's (before a restart with another `BERTH_SPAWNER`) is stopped and
    /// checked with that one, never taken for gone. Servers from before Berth
    /// recorded it are taken to be this worker's.
    pub fn spawner_for(&self, server: &ServerRow) -> Result<Arc<dyn Spawner>, SpawnError> {
        self.spawner_of(server.spawner.as_deref())
    }

    /// The spawner of `kind` (this worker's when `None`).
    pub fn spawner_of(&self, kind: Option<&str>) -> Result<Arc<dyn Spawner>, SpawnError> {
        let Some(kind) = kind.filter(|k| *k != self.spawner.kind()) else {
            return Ok(self.spawner.clone());
        };
        let mut others = self.others.lock().expect("other spawners");
        if let Some(known) = others.iter().find(|s| s.kind() == kind) {
            return Ok(known.clone());
        }
        let made = (self.other_spawner)(kind)?;
        others.push(made.clone());
        Ok(made)
    }

    /// The limits in force, re-read at most once a second so that an admin's
    /// change reaches every worker within that time.
    pub async fn limits(&self) -> Result<Limits, StoreError> {
        if let Some((at, limits)) = *self.limits_cache.lock().expect("limits cache")
            && at.elapsed() < LIMITS_TTL
        {
            return Ok(limits);
        }
        let limits = self.db.limits().await?;
        *self.limits_cache.lock().expect("limits cache") = Some((Instant::now(), limits));
        Ok(limits)
    }

    pub fn jobs_in_flight(&self) -> i32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a job in flight until the guard drops, also when its future is
    /// dropped unfinished (a queue consumer that failed drops its jobs).
    pub fn count_in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    /// Runs `attempt` until it succeeds, fails for good, or has been tried
    /// `max_attempts` times; transient engine errors wait 0.5, 1, 2, 4… seconds.
    pub async fn with_retries<T, F, Fut>(
        &self,
        job: &JobRow,
        mut attempt: F,
    ) -> Result<Result<T, SpawnError>, HandlerError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SpawnError>>,
    {
        let mut tries = 1;
        loop {
            match attempt().await {
                Err(e) if e.is_transient() && tries < self.max_attempts => {
                    let wait = Duration::from_millis(500 << (tries - 1).min(6));
                    tracing::warn!(job = %job.id, error = %e, tries, retry_in = ?wait, "transient failure; retrying");
                    self.db.note_retry(job.id, &e.to_string()).await?;
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.cancelled() => return Err(HandlerError::HandOff),
                    }
                    tries += 1;
                }
                other => return Ok(other),
            }
        }
    }
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
    /// Another delivery of the same job is alive and will finish it: come back
    /// later, in case it dies. Never a reason to give up on the job.
    #[error("{0}")]
    Deferred(String),
    #[error("the worker is shutting down; the job goes back to the queue")]
    HandOff,
}

impl HandlerError {
    /// Whether the queue may give up on the job after this error on its last
    /// delivery: not when the job lives on elsewhere (hand-off, deferral).
    pub fn may_dead_letter(&self) -> bool {
        !matches!(self, HandlerError::HandOff | HandlerError::Deferred(_))
    }
}

/// A handler's result: how the job ended, or an error worth another delivery.
pub type HandlerResult = Result<JobOutcome, HandlerError>;

/// The server a spawn or stop job is about, read under its lock.
pub struct Claimed {
    pub server: ServerRow,
    pub user: UserName,
    pub name: ServerName,
}

pub fn server_payload(job: &JobRow) -> Result<ServerJob, JobOutcome> {
    serde_json::from_value(job.payload.clone())
        .map_err(|e| JobOutcome::Failed(format!("malformed {} payload: {e}", job.kind)))
}

/// The steps every server job shares. Under the server's lock: skip a job that has
/// already ended (a duplicate delivery), count the attempt, check that the server
/// is still in `expected` on behalf of this very job (else the job is moot), run
/// `act`, and record how the job ended, all before the lock is released, so a
/// second delivery waiting on the lock sees the outcome.
pub async fn with_claimed_server<F, Fut>(
    ctx: &Context,
    job: &JobRow,
    expected: ServerState,
    act: F,
) -> Result<(), HandlerError>
where
    F: FnOnce(Claimed) -> Fut,
    Fut: Future<Output = HandlerResult>,
{
    let payload = match server_payload(job) {
        Ok(p) => p,
        Err(outcome) => return Ok(ctx.db.finish_job(job.id, &outcome).await?),
    };
    let lock = ctx.db.lock_server(payload.server_id).await?;
    let result = claimed_locked(ctx, job, payload.server_id, expected, act).await;
    lock.release().await;
    result
}

async fn claimed_locked<F, Fut>(
    ctx: &Context,
    job: &JobRow,
    server_id: i64,
    expected: ServerState,
    act: F,
) -> Result<(), HandlerError>
where
    F: FnOnce(Claimed) -> Fut,
    Fut: Future<Output = HandlerResult>,
{
    let Some(job) = ctx.db.begin_job(job.id, &ctx.worker_name).await? else {
        tracing::debug!(job = %job.id, "already ended; duplicate delivery ignored");
        return Ok(());
    };
    let outcome = match claim(ctx, &job, server_id, expected).await? {
        Ok(claimed) => act(claimed).await?,
        Err(moot) => moot,
    };
    if let JobOutcome::Failed(why) = &outcome {
        tracing::warn!(job = %job.id, error = %why, "job failed");
    }
    ctx.db.finish_job(job.id, &outcome).await?;
    Ok(())
}

async fn claim(
    ctx: &Context,
    job: &JobRow,
    server_id: i64,
    expected: ServerState,
) -> Result<Result<Claimed, JobOutcome>, HandlerError> {
    let Some(server) = ctx.db.server_by_id(server_id).await? else {
        return Ok(Err(JobOutcome::Cancelled(
            "the server no longer exists".into(),
        )));
    };
    let owner = match expected {
        ServerState::PendingStop => server.stop_job_id,
        _ => server.spawn_job_id,
    };
    if server.state != expected || owner != Some(job.id) {
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

/// Whether a job row still needs doing; a final one is a duplicate delivery.
pub fn still_open(job: &JobRow) -> bool {
    job.state.is_open()
}

/// A job counted in flight; see [`Context::count_in_flight`].
pub struct InFlight<'a>(&'a AtomicI32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
