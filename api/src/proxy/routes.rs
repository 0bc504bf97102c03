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

/// A user's routes, when they were read, and whether a request reads them again.
struct Kept {
    routes: Arc<[Route]>,
    at: Instant,
    reading: bool,
}

#[derive(Default)]
struct Inner {
    users: HashMap<String, Kept>,
    /// The names of the users cached, by id: a change names the id.
    names: HashMap<i64, String>,
    /// Counts the changes heard: a read that began before one is not kept.
    generation: u64,
}

impl RouteCache {
    /// Every server of `user`, from the cache or the store. Once kept routes are
    /// stale, one request reads them again while the others use them meanwhile
    /// (a change, heard, drops them at once instead).
    pub async fn of(&self, db: &Db, user: &UserName) -> Result<Arc<[Route]>, StoreError> {
        let generation = {
            let mut inner = self.inner.lock().expect("route cache");
            let generation = inner.generation;
            if let Some(kept) = inner.users.get_mut(user.as_str()) {
                let age = kept.at.elapsed();
                if age < TTL || (kept.reading && age < 2 * TTL) {
                    return Ok(kept.routes.clone());
                }
                kept.reading = true;
            }
            generation
        };
        let read = db.routes_of(user).await;
        let mut inner = self.inner.lock().expect("route cache");
        let routes: Arc<[Route]> = match read {
            Ok(routes) => routes.into(),
            Err(e) => {
                if let Some(kept) = inner.users.get_mut(user.as_str()) {
                    kept.reading = false;
                }
                return Err(e);
            }
        };
        // A user without servers is not kept: their first server's change could
        // not be told apart from anyone's.
        if inner.users.len() >= MOST {
            inner.users.retain(|_, kept| kept.at.elapsed() < TTL);
        }
        if let (true, Some(first)) = (inner.generation == generation, routes.first()) {
            inner.names.insert(first.user_id, user.to_string());
            let kept = Kept {
                routes: routes.clone(),
                at: Instant::now(),
                reading: false,
            };
            inner.users.insert(user.to_string(), kept);
        } else if let Some(kept) = inner.users.get_mut(user.as_str()) {
            // A change was heard meanwhile: what was read may predate it.
            kept.reading = false;
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
