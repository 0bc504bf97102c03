//! A worker's spawns waiting for a slot, oldest first.
//!
//! A freed slot can go only to the oldest waiting spawn (platform-wide; see
//! `try_spawn_slot`), so of a worker's waiters only its oldest asks when one is
//! freed; when a waiter leaves the line (it took a slot, or it is no longer
//! wanted) the next one asks at once, in case another slot is free too. Every
//! waiter still asks now and then on its own: the oldest often (a slot freed
//! without a notice, an older waiter elsewhere gone), the others just often enough
//! to keep their claim fresh. Before, every waiter of a worker asked at every freed
//! slot and every 500 ms: each ask is a transaction of a claim and a count of older
//! waiters, and most of them could only hear "wait".

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use uuid::Uuid;

/// How often the oldest waiter of a worker asks without being woken.
const FIRST_POLL: Duration = Duration::from_millis(500);
/// How often the others ask: well within the 5 s a claim stays fresh, so a waiter
/// keeps its place in the platform's order.
const REST_POLL: Duration = Duration::from_secs(2);

type Key = (DateTime<Utc>, Uuid);

#[derive(Default)]
pub struct SlotLine {
    waiting: Mutex<BTreeMap<Key, Arc<Notify>>>,
}

impl SlotLine {
    /// A slot was freed somewhere: the oldest waiter asks.
    pub fn freed(&self) {
        if let Some(first) = self.waiting.lock().unwrap().values().next() {
            // A permit is kept if it is asking right now: it asks again after.
            first.notify_one();
        }
    }

    /// Joins the line in the order of the job's creation.
    pub fn join(self: &Arc<Self>, created_at: DateTime<Utc>, job_id: Uuid) -> Place {
        let key = (created_at, job_id);
        let woken = Arc::new(Notify::new());
        self.waiting.lock().unwrap().insert(key, woken.clone());
        Place {
            line: self.clone(),
            key,
            woken,
        }
    }
}

/// One spawn's place in its worker's line; leaving it (dropping it) lets the next
/// waiter ask.
pub struct Place {
    line: Arc<SlotLine>,
    key: Key,
    woken: Arc<Notify>,
}

impl Place {
    /// Until this waiter should ask again: woken as the oldest, or its own poll.
    pub async fn next_turn(&self) {
        let first = self.line.waiting.lock().unwrap().keys().next() == Some(&self.key);
        let every = if first { FIRST_POLL } else { REST_POLL };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = self.woken.notified() => {}
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut waiting = self.line.waiting.lock().unwrap();
        waiting.remove(&self.key);
        if let Some(next) = waiting.values().next() {
            next.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    /// Whether `place` is woken (rather than left to its poll) within a moment.
    async fn woken(place: &Place) -> bool {
        tokio::time::timeout(Duration::from_millis(50), place.woken.notified())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_freed_slot_wakes_only_the_oldest_and_leaving_wakes_the_next() {
        let line = Arc::new(SlotLine::default());
        // Joined out of order: the line is by age, not arrival.
        let younger = line.join(at(2), Uuid::new_v4());
        let oldest = line.join(at(0), Uuid::new_v4());
        let middle = line.join(at(1), Uuid::new_v4());

        line.freed();
        assert!(
            woken(&oldest).await,
            "the oldest waiter asks at a freed slot"
        );
        assert!(!woken(&middle).await, "the others are left waiting");
        assert!(!woken(&younger).await);

        // A slot freed while the oldest is busy asking is kept for after.
        line.freed();
        assert!(woken(&oldest).await);
        drop(oldest);
        assert!(
            woken(&middle).await,
            "the next in line asks once the oldest left"
        );
        assert!(!woken(&younger).await);
        drop(middle);
        assert!(woken(&younger).await);
        drop(younger);
        assert!(line.waiting.lock().unwrap().is_empty());
        // Nobody waits: nothing to wake, nothing kept.
        line.freed();
    }
}
