//! Routes read from the store and kept for a few seconds; a change of a server's
//! state or address (heard from any process) drops the user's routes at once, so
//! every replica serves the same routes and a restarted one loses nothing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use schema::{Db, Route, RouteChange, StoreError, UserName, prelude::*};

/// The longest a route is trusted without a change being heard (changes are
/// heard at once; this bounds the harm of one that was missed).
const TTL: Duration = Duration::from_secs(5);

/// Users kept before stale entries are swept.
const MOST: usize = 10_000;

#[derive(Default)]
pub struct RouteCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    users: HashMap<String, (Arc<[Route]>, Instant)>,
    /// The names of the users cached, by id: a change names the id.
    names: HashMap<i64, String>,
    /// Counts the changes heard: a read that began before one is not kept.
    generation: u64,
}

impl RouteCache {
    /// Every server of `user`, from the cache or the store.
    pub async fn of(&self, db: &Db, user: &UserName) -> Result<Arc<[Route]>, StoreError> {
        let generation = {
            let inner = self.inner.lock().expect("route cache");
            if let Some((routes, at)) = inner.users.get(user.as_str())
                && at.elapsed() < TTL
            {
                return Ok(routes.clone());
            }
            inner.generation
        };
        let routes: Arc<[Route]> = db.routes_of(user).await?.into();
        let mut inner = self.inner.lock().expect("route cache");
        // A user without servers is not kept: their first server's change could
        // not be told apart from anyone's.
        if inner.users.len() >= MOST {
            inner.users.retain(|_, (_, at)| at.elapsed() < TTL);
        }
        if let (true, Some(first)) = (inner.generation == generation, routes.first()) {
            inner.names.insert(first.user_id, user.to_string());
            inner
                .users
                .insert(user.to_string(), (routes.clone(), Instant::now()));
        }
        Ok(routes)
    }

    /// Forgets what a change made stale.
    pub fn forget(&self, change: RouteChange) {
        let mut inner = self.inner.lock().expect("route cache");
        inner.generation += 1;
        match change {
            RouteChange::User(id) => {
                if let Some(user) = inner.names.remove(&id) {
                    inner.users.remove(&user);
                }
            }
            RouteChange::All => {
                inner.users.clear();
                inner.names.clear();
            }
        }
    }

    /// Forgets one user's routes (this process changed them).
    pub fn forget_user(&self, user: &UserName) {
        let mut inner = self.inner.lock().expect("route cache");
        inner.generation += 1;
        inner.users.remove(user.as_str());
    }
}
