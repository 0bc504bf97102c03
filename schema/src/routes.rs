//! The proxy's view of the servers: where each of a user's servers answers and
//! with which secret, the changes that make a cached route stale, and the traffic
//! the proxy saw, which the culler reads as activity.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::{
    db::{Db, Dialect, each, execute},
    names::UserName,
    rows::ServerState,
    store::StoreError,
};

/// Postgres channel of route changes; the payload is the id of the servers' owner.
pub const ROUTES_CHANNEL: &str = "berth_routes";

/// One server as the proxy needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Route {
    pub server_id: i64,
    pub user_id: i64,
    pub server_name: String,
    pub state: ServerState,
    /// The internal address (bridge IP or loopback port), while running.
    pub url: Option<String>,
    /// The secret the server accepts from the proxy, while running.
    pub proxy_token: Option<String>,
    pub error: Option<String>,
    pub warning: Option<String>,
}

/// What made cached routes stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteChange {
    /// A server of this user (by id) changed state or address, or was created.
    User(i64),
    /// Changes may have been missed (the listener was away): all of them.
    All,
}

#[async_trait]
pub trait Routes: Send + Sync + 'static {
    /// Every server of the user; empty when the user has none or does not exist.
    async fn routes_of(&self, user: &UserName) -> Result<Vec<Route>, StoreError>;
    /// Moves each server's last activity, and its owner's, forward to the time
    /// seen (never back), in one write. Servers that are gone are passed over.
    async fn record_traffic(&self, seen: &[(i64, DateTime<Utc>)]) -> Result<(), StoreError>;
    /// Passes on every route change, from any process, until `shutdown`: first
    /// `All` once it listens (earlier changes are not known), and `All` again
    /// whenever it listens anew after a lost connection.
    async fn relay_route_changes(
        &self,
        to: broadcast::Sender<RouteChange>,
        shutdown: CancellationToken,
    );
}

#[async_trait]
impl Routes for Db {
    async fn routes_of(&self, user: &UserName) -> Result<Vec<Route>, StoreError> {
        let routes = each!(self.pool(), p => sqlx::query_as::<_, Route>(
            "select s.id as server_id, s.user_id, s.name as server_name, s.state, s.url, \
               s.proxy_token, s.error, s.warning \
             from servers s join users u on u.id = s.user_id where u.name = $1",
        )
        .bind(user.as_str())
        .fetch_all(p)
        .await)?;
        Ok(routes)
    }

    async fn record_traffic(&self, seen: &[(i64, DateTime<Utc>)]) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        match tx.conn() {
            Dialect::Pg(c) => {
                let (ids, times): (Vec<i64>, Vec<DateTime<Utc>>) = seen.iter().copied().unzip();
                sqlx::query(
                    "with seen as (select * from unnest($1::bigint[], $2::timestamptz[]) \
                       as v(id, at)), \
                     moved as (update servers s set last_activity = greatest(s.last_activity, seen.at) \
                       from seen where s.id = seen.id returning s.user_id, seen.at) \
                     update users u set last_activity = greatest(u.last_activity, m.at) \
                     from (select user_id, max(at) as at from moved group by user_id) m \
                     where u.id = m.user_id",
                )
                .bind(&ids)
                .bind(&times)
                .execute(c)
                .await?;
            }
            // One process owns the file: the rows of one turn cost no round trips.
            Dialect::Lite(_) => {
                for (server, at) in seen {
                    execute!(
                        tx.conn(),
                        "update servers set last_activity = max(coalesce(last_activity, $2), $2) \
                         where id = $1",
                        server,
                        at
                    )?;
                    execute!(
                        tx.conn(),
                        "update users set last_activity = max(coalesce(last_activity, $2), $2) \
                         where id = (select user_id from servers where id = $1)",
                        server,
                        at
                    )?;
                }
            }
        }
        tx.commit().await
    }

    async fn relay_route_changes(
        &self,
        to: broadcast::Sender<RouteChange>,
        shutdown: CancellationToken,
    ) {
        match self.on() {
            Dialect::Pg(s) => {
                crate::console::relay_notifications(
                    s.pool(),
                    ROUTES_CHANNEL,
                    &shutdown,
                    || {
                        let _ = to.send(RouteChange::All);
                    },
                    |payload| {
                        if let Ok(id) = payload.parse() {
                            let _ = to.send(RouteChange::User(id));
                        }
                    },
                )
                .await
            }
            Dialect::Lite(s) => {
                let mut heard = s.route_changes();
                // As on Postgres: what happened before this point is not known.
                let _ = to.send(RouteChange::All);
                loop {
                    tokio::select! {
                        change = heard.recv() => match change {
                            Ok(id) => { let _ = to.send(RouteChange::User(id)); }
                            Err(broadcast::error::RecvError::Lagged(_)) => {
                                let _ = to.send(RouteChange::All);
                            }
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
}
