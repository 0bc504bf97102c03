//! Spawn requests that arrive together share one transaction and one commit
//! (group commit). Alone, a request on Postgres cost about ten statements, each a
//! round trip with its own locks, plan and execution: Postgres's CPU, not the
//! disk, capped the API near 1k requests a second on two cores (issue 16). There
//! the requests waiting when a batch starts are decided together in a fixed
//! number of set-wise statements (arrays bound once, `unnest` in the SQL), so the
//! cost per request falls with the load.
//!
//! Each request still gets its own answer: a missing user, a server that is
//! stopping, a per-user or platform limit are answers for that request only, and
//! nothing it wrote stays (a server row it created is removed again). When the
//! batch's transaction fails as a whole (a deadlock, a lost connection), every
//! request of it is tried again alone, so one request's trouble never fails the
//! others. A request for a server already in the batch waits for the batch and
//! then runs alone, seeing what the batch did (one pending spawn, not two).
//!
//! On the embedded store a request's statements cost microseconds and its commit
//! an fsync: the batch's requests run one after another in one transaction, each
//! in a savepoint of its own (`decide_in_parts`).
//!
//! Every answer is sent after the commit, so each 202 is as durable as before.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use tokio::sync::{Semaphore, mpsc, oneshot};
use uuid::Uuid;

use crate::{
    console::{PROGRESS_CHANNEL, ProgressStep},
    db::{Conn, Db, Dialect, each},
    jobs::{JobEnvelope, JobKind, ServerJob},
    rows::{ServerRow, ServerState, UserState},
    store::{SpawnOutcome, SpawnRequest, StoreError},
    telemetry,
};

/// At most this many requests in one transaction.
const MOST: usize = 128;
/// At most this many batches at once. One at a time is fastest (ops/bench
/// enqueue: 3.5k requests/s with one, 2.6k with two or three at once: smaller
/// batches, more statements, commits queueing on the WAL), so the next batch
/// starts when the last has ended, or after `OVERLAP` when it is slow (waiting
/// for a lock, say) so that it holds up no more than that. A 10 ms overlap
/// measured 2.0-3.2k requests/s, 100 ms 3.2-3.8k.
const IN_FLIGHT: usize = 4;
const OVERLAP: std::time::Duration = std::time::Duration::from_millis(100);

/// The first progress event of every spawn.
pub(crate) const REQUESTED: &str = "server requested; waiting for a worker";

type Answer = oneshot::Sender<Result<SpawnOutcome, StoreError>>;

struct Pending {
    req: SpawnRequest,
    answer: Answer,
    /// When the request was handed to the batcher.
    since: std::time::Instant,
}

/// Hands spawn requests to the store's batching task.
pub(crate) struct SpawnBatcher {
    to: mpsc::UnboundedSender<Pending>,
}

impl SpawnBatcher {
    /// Starts the task on the current runtime (`None` outside one). `db` must not
    /// batch itself; the task ends when the last handle to this batcher is dropped.
    pub(crate) fn start(db: Db) -> Option<Self> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (to, mut from) = mpsc::unbounded_channel::<Pending>();
        runtime.spawn(async move {
            let slots = Arc::new(Semaphore::new(IN_FLIGHT));
            let free = Arc::new(FreePlaces::default());
            let (done, mut finished) = mpsc::unbounded_channel::<()>();
            let mut batch = Vec::with_capacity(MOST);
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                if from.recv_many(&mut batch, MOST).await == 0 {
                    return;
                }
                let (db, done, free) = (db.clone(), done.clone(), free.clone());
                let requests = std::mem::take(&mut batch);
                tokio::spawn(async move {
                    decide(&db, &free, requests).await;
                    drop(slot);
                    let _ = done.send(());
                });
                // The next batch starts when this one has ended (what arrived
                // meanwhile goes together), or after OVERLAP if it has not.
                let _ = tokio::time::timeout(OVERLAP, finished.recv()).await;
                while finished.try_recv().is_ok() {}
            }
        });
        Some(Self { to })
    }

    /// The request's outcome once the transaction that decided it has committed.
    pub(crate) async fn request(
        &self,
        db: &Db,
        req: SpawnRequest,
    ) -> Result<SpawnOutcome, StoreError> {
        let (answer, outcome) = oneshot::channel();
        let since = std::time::Instant::now();
        match self.to.send(Pending { req, answer, since }) {
            Ok(()) => match outcome.await {
                Ok(outcome) => outcome,
                // The task is gone (its runtime is shutting down): decide alone.
                Err(_) => Err(StoreError::Conflict(
                    "the store is shutting down; try again".into(),
                )),
            },
            Err(mpsc::error::SendError(pending)) => db.request_spawn_alone(pending.req).await,
        }
    }
}

/// How many admission places at least were free when a batch last read them,
/// less what the batches since could have claimed, and when it was read. While
/// that covers the next batch, the batch is decided by writing without reading
/// the places first: under a steady load of admitted requests the read is a
/// round trip per batch that can only say "not full". The figure only ever errs
/// low (places freed meanwhile are not counted) except when an operator lowers
/// the limit; either way the writing path decides exactly, and the figure is read
/// again at least every `FREE_FOR`.
#[derive(Default)]
struct FreePlaces(std::sync::Mutex<Option<(i64, std::time::Instant)>>);

const FREE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

impl FreePlaces {
    /// Takes `n` places from the figure when it holds them: the batch need not read.
    fn take(&self, n: usize) -> bool {
        let mut known = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *known {
            Some((free, read)) if read.elapsed() < FREE_FOR && *free >= n as i64 => {
                *free -= n as i64;
                true
            }
            _ => false,
        }
    }

    /// What a read found, before the batch of `n` that read it claims its share.
    fn read(&self, free: i64, n: usize) {
        let mut known = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *known = Some((free - n as i64, std::time::Instant::now()));
    }
}

/// Decides one batch and answers each request.
async fn decide(db: &Db, free: &FreePlaces, requests: Vec<Pending>) {
    let began = std::time::Instant::now();
    let (size, waited) = (
        requests.len(),
        requests.iter().map(|p| p.since.elapsed()).max(),
    );
    let read = decide_by_path(db, free, requests).await;
    tracing::debug!(
        requests = size,
        path = if read { "read" } else { "write" },
        waited_ms = waited.unwrap_or_default().as_secs_f64() * 1e3,
        took_ms = began.elapsed().as_secs_f64() * 1e3,
        "a batch of spawn requests decided"
    );
}

/// Decides one batch by reads when the platform is full (true), else by writing.
async fn decide_by_path(db: &Db, free: &FreePlaces, requests: Vec<Pending>) -> bool {
    let known_free = free.take(requests.len());
    let read = if known_free {
        Ok(None)
    } else {
        refused_when_full(db, free, &requests).await
    };
    match read {
        Ok(Some(outcomes)) => {
            answer(db, requests, Ok(outcomes)).await;
            return true;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::debug!(error = %e, "the read before a batch failed; it is decided by writing")
        }
    }
    if let Dialect::Lite(_) = db.pool() {
        decide_in_parts(db, requests).await;
        return false;
    }
    // A second request for a server already in the batch runs after it, alone, and
    // so does one whose profile has a limit of its own (claimed one by one).
    let mut seen = HashSet::new();
    let (together, after): (Vec<Pending>, Vec<Pending>) = requests.into_iter().partition(|p| {
        p.req
            .profile
            .as_ref()
            .is_none_or(|pr| pr.max_active.is_none())
            && seen.insert((
                p.req.user.as_str().to_owned(),
                p.req.server.as_str().to_owned(),
            ))
    });
    let reqs: Vec<&SpawnRequest> = together.iter().map(|p| &p.req).collect();
    let decided = spawn_together(db, &reqs).await;
    answer(db, together, decided).await;
    for pending in after {
        let outcome = db.request_spawn_alone(pending.req).await;
        let _ = pending.answer.send(outcome);
    }
    false
}

type PgTx = sqlx::Transaction<'static, sqlx::Postgres>;
type LiteTx = sqlx::Transaction<'static, sqlx::Sqlite>;

/// A statement's connection in a read transaction of either dialect.
fn conn(tx: &mut Dialect<PgTx, LiteTx>) -> Conn<'_> {
    match tx {
        Dialect::Pg(t) => Dialect::Pg(&mut **t),
        Dialect::Lite(t) => Dialect::Lite(&mut **t),
    }
}

/// The platform limit, whether every place below it has been made (places are
/// made from 0 up, all at once, never removed: the last one tells), and how many
/// of them are free, counted up to `FREE_COUNTED`; one statement over the primary
/// key and the index of free places, whatever the number of places.
const PLACES: &str = "select l.most, \
       exists (select 1 from admission_tokens where slot = l.most - 1), \
       (select count(*) from (select 1 from admission_tokens \
          where server_id is null and slot < l.most limit $2) f) \
     from (select coalesce((select active_server_limit from platform_limits), $1) as most) l";

/// Free places counted at most: enough for several batches of `MOST`.
const FREE_COUNTED: i64 = 1024;

/// When no admission place is free, a batch is answered from reads alone: none
/// of its requests can start a server, and what each is told (already pending or
/// running, stopping, no such user, a limit) needs nothing written. In a storm
/// refusals are most of the requests (950 of 1,000 at a limit of 50), and each
/// went through the batch's writes, its new server row created and removed again.
/// The reads share one snapshot, so every answer held at one moment. `None` when
/// a place is free, or can be made: the batch is decided by writing.
async fn refused_when_full(
    db: &Db,
    free: &FreePlaces,
    requests: &[Pending],
) -> Result<Option<Vec<Result<SpawnOutcome, StoreError>>>, StoreError> {
    let configured = db.configured_limits().active_server_limit as i32;
    let full = |(_, made, free): (i32, bool, i64)| made && free == 0;
    let first: (i32, bool, i64) = each!(db.pool(), p => sqlx::query_as(PLACES)
        .bind(configured)
        .bind(FREE_COUNTED)
        .fetch_one(p)
        .await)?;
    if !full(first) {
        free.read(first.2, requests.len());
        return Ok(None);
    }
    let names: Vec<&str> = requests
        .iter()
        .map(|p| p.req.user.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    // One snapshot: still full, who is active, the users and their servers.
    let mut tx = match db.pool() {
        Dialect::Pg(p) => Dialect::Pg(
            p.begin_with("begin isolation level repeatable read, read only")
                .await?,
        ),
        Dialect::Lite(p) => Dialect::Lite(p.begin().await?),
    };
    let places: (i32, bool, i64) = each!(conn(&mut tx), c => sqlx::query_as(PLACES)
        .bind(configured)
        .bind(FREE_COUNTED)
        .fetch_one(c)
        .await)?;
    let active: i64 = each!(conn(&mut tx), c => sqlx::query_scalar(
        "select count(*) from admission_tokens where server_id is not null",
    )
    .fetch_one(c)
    .await)?;
    let (users, servers): (Vec<(String, UserState)>, Vec<ServerRow>) = match conn(&mut tx) {
        Dialect::Pg(c) => (
            sqlx::query_as("select name, state from users where name = any($1)")
                .bind(&names)
                .fetch_all(&mut *c)
                .await?,
            sqlx::query_as(select_servers!("where u.name = any($1)"))
                .bind(&names)
                .fetch_all(&mut *c)
                .await?,
        ),
        Dialect::Lite(c) => {
            let names = crate::db::json_list(&names);
            (
                sqlx::query_as(
                    "select name, state from users \
                     where name in (select value from json_each($1))",
                )
                .bind(&names)
                .fetch_all(&mut *c)
                .await?,
                sqlx::query_as(select_servers!(
                    "where u.name in (select value from json_each($1))"
                ))
                .bind(&names)
                .fetch_all(&mut *c)
                .await?,
            )
        }
    };
    match tx {
        Dialect::Pg(t) => t.commit().await?,
        Dialect::Lite(t) => t.commit().await?,
    }
    if !full(places) {
        return Ok(None);
    }
    let users: HashMap<&str, UserState> = users.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let mut live: HashMap<&str, i64> = HashMap::new();
    for row in &servers {
        if matches!(
            row.state,
            ServerState::PendingSpawn | ServerState::Running | ServerState::PendingStop
        ) {
            *live.entry(row.user_name.as_str()).or_default() += 1;
        }
    }
    let servers: HashMap<(&str, &str), &ServerRow> = servers
        .iter()
        .map(|row| ((row.user_name.as_str(), row.name.as_str()), row))
        .collect();
    let limit = places.0;
    Ok(Some(
        requests
            .iter()
            .map(|Pending { req, .. }| {
                let user = req.user.as_str();
                match users.get(user) {
                    None => return Err(StoreError::no_user(&req.user)),
                    Some(UserState::Deleting) => return Err(StoreError::user_deleting(&req.user)),
                    Some(_) => {}
                }
                match servers
                    .get(&(user, req.server.as_str()))
                    .map(|row| (row.state, *row))
                {
                    Some((ServerState::PendingSpawn, row)) => {
                        return Ok(SpawnOutcome::AlreadyPending(row.clone()));
                    }
                    Some((ServerState::Running, row)) => {
                        return Ok(SpawnOutcome::AlreadyRunning(row.clone()));
                    }
                    Some((ServerState::PendingStop, _)) => {
                        return Err(StoreError::server_stopping());
                    }
                    _ => {}
                }
                let mine = live.get(user).copied().unwrap_or(0);
                match req.max_servers_per_user {
                    Some(most) if mine >= i64::from(most) => {
                        Err(StoreError::per_user_limit(&req.user, mine, most))
                    }
                    _ => Err(StoreError::platform_full(active, limit)),
                }
            })
            .collect(),
    ))
}

/// Sends each request its outcome; when the batch failed as a whole, each is
/// decided again alone.
async fn answer(
    db: &Db,
    requests: Vec<Pending>,
    decided: Result<Vec<Result<SpawnOutcome, StoreError>>, StoreError>,
) {
    match decided {
        Ok(outcomes) => {
            for (pending, outcome) in requests.into_iter().zip(outcomes) {
                let _ = pending.answer.send(outcome);
            }
        }
        Err(e) => {
            tracing::warn!(
                requests = requests.len(),
                error = %e,
                "a batch of spawn requests failed as a whole; each is tried alone"
            );
            for pending in requests {
                let outcome = db.request_spawn_alone(pending.req).await;
                let _ = pending.answer.send(outcome);
            }
        }
    }
}

/// The embedded store: the batch's requests one after another in one
/// transaction, each in a part of its own (a savepoint, undone if the request is
/// refused), and one commit for all. SQLite's statements run in the process in
/// microseconds; what a request alone costs there is its commit's fsync, which
/// the writers took in turns.
async fn decide_in_parts(db: &Db, requests: Vec<Pending>) {
    let decided = async {
        let mut tx = db.begin().await?;
        let mut outcomes = Vec::with_capacity(requests.len());
        for pending in &requests {
            let part = tx.part().await?;
            let outcome = db.spawn_in(&mut tx, &pending.req).await;
            match outcome {
                Ok(_) => tx.keep(part).await?,
                Err(_) => tx.undo(part).await?,
            }
            outcomes.push(outcome);
        }
        tx.commit().await?;
        Ok::<_, StoreError>(outcomes)
    }
    .await;
    answer(db, requests, decided).await;
}

/// What became of one request while its batch is decided (one per request, for
/// the batch's length: their size does not matter).
#[allow(clippy::large_enum_variant)]
enum Step {
    Done(Result<SpawnOutcome, StoreError>),
    /// The server is already pending or running: answered with its row.
    Current(i64),
    /// A spawn is wanted for this server.
    Wants(Want),
}

#[derive(Clone, Copy)]
struct Want {
    server_id: i64,
    user_id: i64,
    /// The row was created by this batch (removed again if the request is refused).
    inserted: bool,
}

/// One transaction for `reqs` (distinct servers): an outcome per request, in
/// order. An `Err` means the transaction failed and nothing of it stays.
async fn spawn_together(
    db: &Db,
    reqs: &[&SpawnRequest],
) -> Result<Vec<Result<SpawnOutcome, StoreError>>, StoreError> {
    let mut tx = db.begin().await?;
    let Dialect::Pg(c) = tx.conn() else {
        unreachable!("batches run on Postgres only")
    };
    let at = crate::db::now();

    // Lock the users in id order (concurrent batches never wait on each other in
    // a cycle), so that a user's deletion waits. Under a per-user limit the lock
    // is exclusive: one user's requests take turns, so the count is exact, as
    // alone. Without one, concurrent batches share it, and only requests for the
    // same server take turns (on the server's row). In the same statement, the batch's server rows are created on first use
    // and locked, in (user, name) order, for users that exist and are not being
    // deleted; `inserted` says which rows are new (removed again if their request
    // is refused). One statement, not two: a batch's round trips are serial,
    // and every request of it waits for each. It returns a row per user, with
    // each of the batch's servers of theirs.
    let names: Vec<&str> = reqs
        .iter()
        .map(|r| r.user.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let (wanted_users, wanted_servers): (Vec<&str>, Vec<&str>) = reqs
        .iter()
        .map(|r| (r.user.as_str(), r.server.as_str()))
        .unzip();
    let exclusive = reqs.iter().any(|r| r.max_servers_per_user.is_some());
    type Found = (
        i64,
        String,
        UserState,
        i32,
        Option<i64>,
        Option<String>,
        Option<ServerState>,
        Option<bool>,
    );
    macro_rules! users_and_servers {
        ($lock:literal) => {
            concat!(
                "with u as (select u.id, u.name, u.state from users u where u.name = any($1) \
                   order by u.id for ", $lock, " of u), \
                 wanted as (select u.id as user_id, v.name from u \
                   join unnest($2::text[], $3::text[]) as v(user_name, name) \
                     on v.user_name = u.name \
                   where u.state <> 'deleting' order by u.id, v.name), \
                 s as (insert into servers \
                     (user_id, name, state, requested_at, created_at, updated_at) \
                   select user_id, name, 'stopped', $4, $4, $4 from wanted \
                   on conflict (user_id, name) do update set updated_at = servers.updated_at \
                   returning id, user_id, name, state, (xmax = 0) as inserted) \
                 select u.id, u.name, u.state, \
                   coalesce((select active_server_limit from platform_limits), $5), \
                   s.id, s.name, s.state, s.inserted \
                 from u left join s on s.user_id = u.id"
            )
        };
    }
    let found: Vec<Found> = sqlx::query_as(if exclusive {
        users_and_servers!("update")
    } else {
        users_and_servers!("share")
    })
    .bind(&names)
    .bind(&wanted_users)
    .bind(&wanted_servers)
    .bind(at)
    .bind(db.configured_limits().active_server_limit as i32)
    .fetch_all(&mut *c)
    .await?;
    let limit = found.first().map_or(0, |f| f.3);
    let users: HashMap<&str, (i64, UserState)> = found
        .iter()
        .map(|(id, name, state, ..)| (name.as_str(), (*id, *state)))
        .collect();
    let rows: HashMap<(i64, &str), (i64, ServerState, bool)> = found
        .iter()
        .filter_map(|(user_id, _, _, _, id, name, state, inserted)| {
            Some((
                (*user_id, name.as_deref()?),
                ((*id)?, (*state)?, (*inserted)?),
            ))
        })
        .collect();

    let mut steps: Vec<Option<Step>> = Vec::with_capacity(reqs.len());
    for req in reqs {
        steps.push(match users.get(req.user.as_str()) {
            None => Some(Step::Done(Err(StoreError::no_user(&req.user)))),
            Some((_, UserState::Deleting)) => {
                Some(Step::Done(Err(StoreError::user_deleting(&req.user))))
            }
            Some(_) => None,
        });
    }

    // Servers already pending, running or stopping answer as they are.
    for (req, step) in reqs.iter().zip(steps.iter_mut()) {
        if step.is_some() {
            continue;
        }
        let (user_id, _) = users[req.user.as_str()];
        let (server_id, state, inserted) = rows[&(user_id, req.server.as_str())];
        *step = Some(match state {
            ServerState::PendingSpawn | ServerState::Running => Step::Current(server_id),
            ServerState::PendingStop => Step::Done(Err(StoreError::server_stopping())),
            ServerState::Stopped | ServerState::Failed => Step::Wants(Want {
                server_id,
                user_id,
                inserted,
            }),
        });
    }
    let current: Vec<i64> = steps
        .iter()
        .filter_map(|s| match s {
            Some(Step::Current(id)) => Some(*id),
            _ => None,
        })
        .collect();
    if !current.is_empty() {
        // Their rows as they are, as a request alone answers with them.
        let mut rows: HashMap<i64, ServerRow> =
            sqlx::query_as::<_, ServerRow>(select_servers!("where s.id = any($1)"))
                .bind(&current)
                .fetch_all(&mut *c)
                .await?
                .into_iter()
                .map(|row| (row.id, row))
                .collect();
        for step in steps.iter_mut() {
            if let Some(Step::Current(id)) = step {
                let row = rows.remove(id).expect("a locked server is there");
                *step = Some(Step::Done(Ok(match row.state {
                    ServerState::Running => SpawnOutcome::AlreadyRunning(row),
                    _ => SpawnOutcome::AlreadyPending(row),
                })));
            }
        }
    }

    // The per-user limit, counted once for every user of the batch.
    let limited: Vec<i64> = reqs
        .iter()
        .zip(&steps)
        .filter(|(r, s)| r.max_servers_per_user.is_some() && matches!(s, Some(Step::Wants(..))))
        .map(|(r, _)| users[r.user.as_str()].0)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let mut live: HashMap<i64, i64> = if limited.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as::<_, (i64, i64)>(
            "select user_id, count(*) from servers where user_id = any($1) \
             and state in ('pending_spawn', 'running', 'pending_stop') group by user_id",
        )
        .bind(&limited)
        .fetch_all(&mut *c)
        .await?
        .into_iter()
        .collect()
    };
    let mut refused_new = vec![];
    for (req, step) in reqs.iter().zip(steps.iter_mut()) {
        let (Some(most), Some(Step::Wants(want))) = (req.max_servers_per_user, &*step) else {
            continue;
        };
        let count = live.entry(want.user_id).or_default();
        if *count >= i64::from(most) {
            if want.inserted {
                refused_new.push(want.server_id);
            }
            *step = Some(Step::Done(Err(StoreError::per_user_limit(
                &req.user, *count, most,
            ))));
        } else {
            *count += 1;
        }
    }

    // The spawns, first come first served in the batch's order: each claims an
    // admission place, and those that got one are written (jobs, queue entries,
    // the servers' new state, progress).
    let wanting: Vec<(usize, Want)> = steps
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            Some(Step::Wants(want)) => Some((i, *want)),
            _ => None,
        })
        .collect();
    let spawns = spawn_admitted(&mut tx, db, reqs, &wanting, limit, at).await?;
    let Dialect::Pg(c) = tx.conn() else {
        unreachable!()
    };
    let mut admitted: HashMap<i64, ServerRow> =
        spawns.into_iter().map(|row| (row.id, row)).collect();
    let mut active = None;
    for (i, want) in &wanting {
        if let Some(mut row) = admitted.remove(&want.server_id) {
            row.user_name = reqs[*i].user.as_str().to_owned();
            steps[*i] = Some(Step::Done(Ok(SpawnOutcome::Enqueued(row))));
            continue;
        }
        if want.inserted {
            refused_new.push(want.server_id);
        }
        let active = match active {
            Some(n) => n,
            None => {
                let n: i64 = sqlx::query_scalar(
                    "select count(*) from admission_tokens where server_id is not null",
                )
                .fetch_one(&mut *c)
                .await?;
                *active.insert(n)
            }
        };
        steps[*i] = Some(Step::Done(Err(StoreError::platform_full(active, limit))));
    }
    if !refused_new.is_empty() {
        sqlx::query("delete from servers where id = any($1)")
            .bind(&refused_new)
            .execute(&mut *c)
            .await?;
    }
    tx.commit().await?;
    Ok(steps
        .into_iter()
        .map(|step| match step {
            Some(Step::Done(outcome)) => outcome,
            _ => unreachable!("every request of the batch is decided"),
        })
        .collect())
}

/// Claims the lowest free admission places below `limit` for the `wanting`
/// servers, in their order, skipping places other transactions are claiming, and
/// spawns those that got one: their jobs, first progress events, new state and
/// queue entries. Creates missing places once when too few were free. The rows of
/// the servers spawned.
///
/// The claim and the writes are one statement (a data-modifying CTE feeds the
/// claimed servers to the inserts): a batch's round trips are serial, and every
/// request of it waits for each.
async fn spawn_admitted(
    tx: &mut crate::db::Tx,
    db: &Db,
    reqs: &[&SpawnRequest],
    wanting: &[(usize, Want)],
    limit: i32,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<ServerRow>, StoreError> {
    let mut spawned: Vec<ServerRow> = Vec::with_capacity(wanting.len());
    let mut jobs: HashMap<i64, Uuid> = HashMap::new();
    for provisioned in [false, true] {
        let rest: Vec<(usize, Want, Uuid)> = wanting
            .iter()
            .filter(|(_, w)| !jobs.contains_key(&w.server_id))
            .map(|&(i, w)| (i, w, Uuid::now_v7()))
            .collect();
        if rest.is_empty() {
            break;
        }
        let ids: Vec<Uuid> = rest.iter().map(|(_, _, id)| *id).collect();
        let user_names: Vec<&str> = rest
            .iter()
            .map(|(i, _, _)| reqs[*i].user.as_str())
            .collect();
        let user_ids: Vec<i64> = rest.iter().map(|(_, w, _)| w.user_id).collect();
        let server_ids: Vec<i64> = rest.iter().map(|(_, w, _)| w.server_id).collect();
        let server_names: Vec<&str> = rest
            .iter()
            .map(|(i, _, _)| reqs[*i].server.as_str())
            .collect();
        let images: Vec<Option<&str>> = rest
            .iter()
            .map(|(i, _, _)| reqs[*i].image.as_deref())
            .collect();
        let profiles: Vec<Option<&crate::profiles::Profile>> = rest
            .iter()
            .map(|(i, _, _)| reqs[*i].profile.as_ref())
            .collect();
        let profile_names: Vec<Option<&str>> = profiles
            .iter()
            .map(|p| p.map(|p| p.name.as_str()))
            .collect();
        let profile_specs: Vec<Option<String>> =
            profiles.iter().map(|p| p.map(|p| p.to_json())).collect();
        let idle_timeouts: Vec<Option<i64>> = profiles
            .iter()
            .map(|p| p.and_then(|p| p.idle_timeout))
            .collect();
        let max_ages: Vec<Option<i64>> =
            profiles.iter().map(|p| p.and_then(|p| p.max_age)).collect();
        let payloads: Vec<serde_json::Value> = server_ids
            .iter()
            .map(|&server_id| {
                serde_json::to_value(ServerJob { server_id }).expect("payload serialises")
            })
            .collect();
        let Dialect::Pg(c) = tx.conn() else {
            unreachable!("batches run on Postgres only")
        };
        let rows: Vec<ServerRow> = sqlx::query_as(
            "with v as (select * from unnest($1::bigint[], $2::uuid[], $3::text[], \
               $5::text[], $6::text[], $7::bigint[], $8::bigint[], $9::text[], \
               $10::bigint[], $11::text[], $12::jsonb[]) with ordinality \
               as v(sid, job, img, profile, spec, idle, age, uname, uid, sname, payload, n)), \
             free as (select slot from admission_tokens \
               where server_id is null and slot < $14 \
               order by slot limit $15 for update skip locked), \
             numbered as (select slot, row_number() over (order by slot) as n from free), \
             claimed as (update admission_tokens a set server_id = v.sid \
               from numbered join v on v.n = numbered.n \
               where a.slot = numbered.slot returning a.server_id), \
             w as (select v.* from v join claimed on claimed.server_id = v.sid), \
             new_jobs as (insert into jobs \
               (id, kind, user_name, user_id, server_name, payload, created_at) \
               select job, 'spawn', uname, uid, sname, payload, $4 from w returning id), \
             events as (insert into spawn_events \
               (job_id, progress, message, ready, failed, url, created_at) \
               select id, 0, $13, false, false, null, $4 from new_jobs) \
             update servers s set state = 'pending_spawn', spawn_job_id = w.job, \
               stop_job_id = null, image = w.img, error = null, url = null, \
               container_id = null, started_at = null, stopped_at = null, \
               requested_at = $4, updated_at = $4, profile = w.profile, \
               profile_spec = w.spec, idle_timeout_secs = w.idle, max_age_secs = w.age \
             from w where s.id = w.sid \
             returning s.id, s.user_id, ''::text as user_name, s.name, s.state, s.image, \
               s.spawn_job_id, s.stop_job_id, s.container_id, s.url, s.error, \
               s.requested_at, s.started_at, s.stopped_at, s.last_activity, s.warning, \
               s.profile, s.profile_spec, s.idle_timeout_secs, s.max_age_secs",
        )
        .bind(&server_ids)
        .bind(&ids)
        .bind(&images)
        .bind(at)
        .bind(&profile_names)
        .bind(&profile_specs)
        .bind(&idle_timeouts)
        .bind(&max_ages)
        .bind(&user_names)
        .bind(&user_ids)
        .bind(&server_names)
        .bind(&payloads)
        .bind(ProgressStep::at(0, REQUESTED).message)
        .bind(limit)
        .bind(rest.len() as i64)
        .fetch_all(&mut *c)
        .await?;
        for row in &rows {
            let job = row.spawn_job_id.expect("a spawned server has its job");
            jobs.insert(row.id, job);
        }
        spawned.extend(rows);
        if jobs.len() == wanting.len() || provisioned {
            break;
        }
        let places: i64 =
            sqlx::query_scalar("select count(*) from admission_tokens where slot < $1")
                .bind(limit)
                .fetch_one(&mut *c)
                .await?;
        if places >= i64::from(limit) {
            break;
        }
        crate::servers::provision_admission(tx, limit).await?;
    }
    if spawned.is_empty() {
        return Ok(spawned);
    }
    // Their queue entries, in the batch's order.
    let envelopes: Vec<(JobEnvelope, i64)> = wanting
        .iter()
        .filter_map(|(_, w)| {
            jobs.get(&w.server_id).map(|&job_id| {
                let envelope = JobEnvelope {
                    job_id,
                    kind: JobKind::Spawn,
                };
                (envelope, w.server_id)
            })
        })
        .collect();
    let only: Vec<JobEnvelope> = envelopes.iter().map(|(e, _)| *e).collect();
    db.queue().enqueue_many(tx.conn(), &only, at).await?;
    for (envelope, server_id) in &envelopes {
        if let Some((channel, payload)) = db.queue().notice(envelope) {
            tx.notify_after_commit(channel, payload);
        }
        tx.notify_after_commit(PROGRESS_CHANNEL, envelope.job_id.to_string());
        tx.route_changed(*server_id);
        telemetry::job_enqueued(JobKind::Spawn);
    }
    tx.mark_enqueued();
    Ok(spawned)
}

#[cfg(test)]
mod tests {
    use super::FreePlaces;

    #[test]
    fn a_count_of_free_places_covers_batches_until_they_could_have_claimed_it() {
        let free = FreePlaces::default();
        assert!(!free.take(1), "nothing read yet: the batch reads");
        // A batch of 3 read 10 free places: 7 are left for the batches after it.
        free.read(10, 3);
        assert!(free.take(5));
        assert!(free.take(2));
        assert!(
            !free.take(1),
            "every counted place could be claimed: read again"
        );
        // A read that found none (the platform not yet full, or its places not
        // yet made) covers nothing.
        free.read(0, 1);
        assert!(!free.take(1));
    }
}
