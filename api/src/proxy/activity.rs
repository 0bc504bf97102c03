//! Activity taken from real traffic: the time of each server's latest request
//! from a client and latest client→server WebSocket message, kept in memory and
//! written in one statement every few seconds, only ever forward. Requests an
//! idle tab makes by itself (polling paths, by default Jupyter's) do not count,
//! nor does anything a server sends, nor WebSocket pings.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use chrono::{DateTime, Utc};
use schema::{Db, prelude::*};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub struct Traffic {
    seen: Mutex<HashMap<i64, DateTime<Utc>>>,
}

impl Traffic {
    /// The server had activity now.
    pub fn touch(&self, server_id: i64) {
        self.seen
            .lock()
            .expect("traffic")
            .insert(server_id, schema::db::now());
    }

    /// Writes what was seen since the last write; kept for the next one if the
    /// write fails.
    pub async fn flush(&self, db: &Db) {
        let seen: Vec<(i64, DateTime<Utc>)> = self.seen.lock().expect("traffic").drain().collect();
        if seen.is_empty() {
            return;
        }
        if let Err(e) = db.record_traffic(&seen).await {
            tracing::warn!(servers = seen.len(), error = %e, "could not record activity; trying again");
            let mut kept = self.seen.lock().expect("traffic");
            for (server, at) in seen {
                let newest = kept.entry(server).or_insert(at);
                *newest = (*newest).max(at);
            }
        }
    }
}

/// Writes the activity seen every `every` until `shutdown`, and once more then.
pub async fn write_loop(traffic: &Traffic, db: &Db, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => traffic.flush(db).await,
            _ = shutdown.cancelled() => {
                traffic.flush(db).await;
                return;
            }
        }
    }
}

/// Whether a request counts as the user's activity: anything but a GET or HEAD
/// of a path an idle tab polls. `rest` is the path under the server's prefix.
pub fn counts(method: &axum::http::Method, rest: &str, ignored: &[String]) -> bool {
    if method != axum::http::Method::GET && method != axum::http::Method::HEAD {
        return true;
    }
    let rest = rest.trim_start_matches('/');
    !ignored.iter().any(|prefix| {
        rest.strip_prefix(prefix.as_str())
            .is_some_and(|after| after.is_empty() || after.starts_with(['/', '?']))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn polling_paths_are_ignored_for_reads_only() {
        let ignored = vec!["api/kernels".to_owned(), "api/status".to_owned()];
        assert!(!counts(&Method::GET, "api/kernels", &ignored));
        assert!(!counts(&Method::GET, "/api/kernels/1234", &ignored));
        assert!(!counts(&Method::HEAD, "api/status", &ignored));
        assert!(
            counts(&Method::POST, "api/kernels", &ignored),
            "starting a kernel"
        );
        assert!(
            counts(&Method::GET, "api/kernelspecs", &ignored),
            "another path"
        );
        assert!(counts(&Method::GET, "lab/tree/notebook.ipynb", &ignored));
        assert!(counts(&Method::GET, "", &ignored));
    }
}
