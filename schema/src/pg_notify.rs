//! Notifications on Postgres, sent after commits, in batches, by one task per
//! store. Postgres takes one lock for the whole database while a transaction that
//! issued NOTIFY commits, so a NOTIFY inside each request's transaction made the
//! commits one at a time (pgbench, 50 clients: 3,680 tps without, 1,320 with one
//! NOTIFY inside), and a NOTIFY of its own after each commit still queued every
//! request on that lock (sampled `pg_activity` under wrk: 38 of 90 active
//! backends waiting on `Lock:object` in it). Here a request hands its
//! notifications over and goes on; the task sends what has gathered in one
//! statement, so under load many requests share one NOTIFY transaction and when
//! idle a notification leaves at once. Notifications are hints: a listener that
//! misses one (a crash between the commit and the send) catches up at its next
//! poll or cache expiry.

use sqlx::PgPool;
use tokio::sync::mpsc;

use crate::routes::ROUTES_CHANNEL;

/// What one committed transaction has to tell.
struct Batch {
    notices: Vec<(&'static str, String)>,
    /// Servers whose route changed: their owners are told on `ROUTES_CHANNEL`.
    routes: Vec<i64>,
}

/// Hands notifications to the store's sending task.
#[derive(Clone)]
pub(crate) struct Notifier {
    to: Option<mpsc::UnboundedSender<Batch>>,
    pool: PgPool,
}

/// At most this many transactions' notifications go in one statement.
const MOST: usize = 512;

impl Notifier {
    /// Starts the sending task (when a runtime runs; else each send waits for
    /// its own statement). It ends when the last store handle is dropped.
    pub(crate) fn start(pool: PgPool) -> Self {
        let to = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let (to, mut from) = mpsc::unbounded_channel::<Batch>();
            let pool = pool.clone();
            runtime.spawn(async move {
                let mut batches = Vec::with_capacity(MOST);
                while from.recv_many(&mut batches, MOST).await > 0 {
                    send(&pool, batches.drain(..)).await;
                }
            });
            to
        });
        Self { to, pool }
    }

    /// Sends after a commit; never waits for the database while the task runs.
    pub(crate) async fn send(&self, notices: Vec<(&'static str, String)>, routes: Vec<i64>) {
        if notices.is_empty() && routes.is_empty() {
            return;
        }
        let batch = Batch { notices, routes };
        let batch = match &self.to {
            Some(to) => match to.send(batch) {
                Ok(()) => return,
                Err(mpsc::error::SendError(batch)) => batch,
            },
            None => batch,
        };
        send(&self.pool, std::iter::once(batch)).await;
    }
}

/// Sends `notices` at once as the store's task does after a commit, for a caller
/// that enqueues without a store (`ops/bench/queues` enqueues as the API does).
pub async fn send_now(pool: &PgPool, notices: Vec<(&'static str, String)>) {
    let routes = vec![];
    send(pool, std::iter::once(Batch { notices, routes })).await;
}

async fn send(pool: &PgPool, batches: impl Iterator<Item = Batch>) {
    let mut channels: Vec<&str> = vec![];
    let mut payloads: Vec<String> = vec![];
    let mut routes: Vec<i64> = vec![];
    for batch in batches {
        for (channel, payload) in batch.notices {
            // Postgres folds identical notifications of one transaction anyway.
            channels.push(channel);
            payloads.push(payload);
        }
        routes.extend(batch.routes);
    }
    routes.sort_unstable();
    routes.dedup();
    // Notifications are hints, so their transaction's commit need not wait for
    // the disk: `set_config(…, true)` lasts to the end of this statement's own
    // transaction, its commit included (one fsync less per batch; the
    // notifications still leave at the commit).
    let sent = sqlx::query(
        "select set_config('synchronous_commit', 'off', true), count(pg_notify(c, p)) from ( \
           select c, p from unnest($1::text[], $2::text[]) as n(c, p) \
           union all \
           select $3, user_id::text from \
             (select distinct user_id from servers where id = any($4)) o) x",
    )
    .bind(&channels)
    .bind(&payloads)
    .bind(ROUTES_CHANNEL)
    .bind(&routes)
    .execute(pool)
    .await;
    if let Err(e) = sent {
        tracing::warn!(error = %e, "notifications were not sent; listeners catch up when they poll");
    }
}
