//! `berth scheduler`: periodic work on cron expressions. Like the API it only
//! enqueues jobs (cull, expire_sessions, archive) that workers carry out.
//!
//! A tick is the pair (schedule, scheduled time), unique in `schedule_runs`: any
//! number of replicas may run, and each tick is enqueued once, by whichever gets
//! there first. Only the latest due tick is ever enqueued, so ticks missed while
//! no scheduler ran are made up once on start-up, not once each.

use schema::settings::at_least;
use std::{str::FromStr, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use cron::Schedule;
use schema::{
    Db, JobKind,
    jobs::{ArchiveJob, CullJob},
    prelude::*,
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("database: {0}")]
    Store(#[from] schema::StoreError),
}

#[derive(Debug, Clone, clap::Args)]
pub struct SchedulerConfig {
    /// When to cull idle servers: a cron expression with seconds
    /// (`sec min hour day month weekday`; five fields mean seconds = 0), or `off`.
    #[arg(long, env = "BERTH_CULL_SCHEDULE", default_value = "0 */10 * * * *",
          value_parser = |s: &str| schedule_setting("BERTH_CULL_SCHEDULE", s))]
    pub cull_schedule: String,

    /// Seconds without activity after which a running server is stopped.
    #[arg(long, env = "BERTH_IDLE_TIMEOUT", default_value_t = 3600,
          value_parser = |s: &str| at_least("BERTH_IDLE_TIMEOUT", 1_i64, s))]
    pub idle_timeout: i64,

    /// Seconds after which a server is stopped whatever its activity; 0: no cap.
    #[arg(long, env = "BERTH_MAX_AGE", default_value_t = 0,
          value_parser = |s: &str| at_least("BERTH_MAX_AGE", 0_i64, s))]
    pub max_age: i64,

    /// Seconds before the maximum age that the user is warned (on the server).
    #[arg(long, env = "BERTH_MAX_AGE_WARNING", default_value_t = 600,
          value_parser = |s: &str| at_least("BERTH_MAX_AGE_WARNING", 0_i64, s))]
    pub max_age_warning: i64,

    /// Leave admins' servers alone when culling.
    #[arg(long, env = "BERTH_CULL_EXEMPT_ADMINS", default_value_t = false)]
    pub cull_exempt_admins: bool,

    /// When to remove expired sessions, SSO tokens and revoked tokens, or `off`.
    #[arg(
        long,
        env = "BERTH_SESSION_EXPIRY_SCHEDULE",
        default_value = "0 */5 * * * *",
        value_parser = |s: &str| schedule_setting("BERTH_SESSION_EXPIRY_SCHEDULE", s)
    )]
    pub session_expiry_schedule: String,

    /// When to archive old job, audit and activity rows, or `off`.
    #[arg(long, env = "BERTH_ARCHIVE_SCHEDULE", default_value = "0 0 2 * * *",
          value_parser = |s: &str| schedule_setting("BERTH_ARCHIVE_SCHEDULE", s))]
    pub archive_schedule: String,

    /// Rows older than this many days are archived.
    #[arg(long, env = "BERTH_ARCHIVE_AFTER_DAYS", default_value_t = 90,
          value_parser = |s: &str| at_least("BERTH_ARCHIVE_AFTER_DAYS", 1_i64, s))]
    pub archive_after_days: i64,

    /// Where archive files go (on the worker that runs the archive job: shared
    /// storage when workers run on several hosts).
    #[arg(long, env = "BERTH_ARCHIVE_DIR", default_value = "archive")]
    pub archive_dir: String,

    /// Milliseconds between the scheduler's looks at the clock.
    #[arg(long, env = "BERTH_SCHEDULER_TICK_MS", default_value_t = 250,
          value_parser = |s: &str| at_least("BERTH_SCHEDULER_TICK_MS", 1_u64, s))]
    pub tick_ms: u64,
}

/// One schedule: its name, when, and the job it enqueues.
struct Entry {
    name: &'static str,
    expression: String,
    schedule: Schedule,
    kind: JobKind,
    payload: serde_json::Value,
    /// Ticks at or before this are done (by any replica) or predate the schedule.
    done_until: DateTime<Utc>,
    next: Option<DateTime<Utc>>,
}

/// A schedule setting as given, once it parses (or is `off`).
fn schedule_setting(setting: &str, raw: &str) -> Result<String, String> {
    if raw.trim().eq_ignore_ascii_case("off") {
        return Ok(raw.to_owned());
    }
    let fields = raw.split_whitespace().count();
    if !(5..=7).contains(&fields) {
        return Err(format!(
            "{setting} {raw:?} has {fields} fields; a schedule is a cron expression of six: \
             `sec min hour day month weekday` (five: seconds = 0), or `off`"
        ));
    }
    parse_schedule(raw)
        .map(|_| raw.to_owned())
        .map_err(|e| format!("{setting}: {e}"))
}

/// Parses a cron expression; five fields (no seconds) are accepted as seconds = 0.
pub fn parse_schedule(expression: &str) -> Result<Schedule, String> {
    let fields = expression.split_whitespace().count();
    let full = if fields == 5 {
        format!("0 {expression}")
    } else {
        expression.to_owned()
    };
    Schedule::from_str(&full).map_err(|e| format!("cron expression {expression:?}: {e}"))
}

/// The latest tick at or before `now`.
pub fn latest_tick(schedule: &Schedule, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let just_after = now + chrono::Duration::milliseconds(1);
    schedule.after(&just_after).next_back()
}

impl SchedulerConfig {
    fn entries(&self) -> Result<Vec<Entry>, String> {
        let cull = CullJob {
            idle_timeout_secs: self.idle_timeout.max(1),
            max_age_secs: self.max_age.max(0),
            max_age_warning_secs: self.max_age_warning.max(0),
            exempt_admins: self.cull_exempt_admins,
        };
        let archive = ArchiveJob {
            after_days: self.archive_after_days.max(0),
            dir: self.archive_dir.clone(),
        };
        let all = [
            (
                "cull",
                &self.cull_schedule,
                JobKind::Cull,
                serde_json::to_value(cull),
            ),
            (
                "session_expiry",
                &self.session_expiry_schedule,
                JobKind::ExpireSessions,
                Ok(serde_json::json!({})),
            ),
            (
                "archive",
                &self.archive_schedule,
                JobKind::Archive,
                serde_json::to_value(archive),
            ),
        ];
        let mut entries = Vec::new();
        for (name, expression, kind, payload) in all {
            if expression.trim().eq_ignore_ascii_case("off") {
                continue;
            }
            entries.push(Entry {
                name,
                expression: expression.trim().to_owned(),
                schedule: parse_schedule(expression)?,
                kind,
                payload: payload.expect("serialises"),
                done_until: DateTime::<Utc>::MIN_UTC,
                next: None,
            });
        }
        Ok(entries)
    }
}

/// Runs the scheduler over `store` until `shutdown` fires.
pub async fn run(
    config: SchedulerConfig,
    store: Arc<Db>,
    shutdown: CancellationToken,
) -> Result<(), SchedulerError> {
    let mut entries = config.entries().map_err(SchedulerError::Config)?;
    for entry in &mut entries {
        store
            .register_schedule(entry.name, &entry.expression, entry.kind, &entry.payload)
            .await?;
        entry.done_until = store.schedule_baseline(entry.name).await?;
        tracing::info!(schedule = entry.name, expression = %entry.expression, "scheduled");
    }
    let every = Duration::from_millis(config.tick_ms.max(10));
    loop {
        for entry in &mut entries {
            if let Err(e) = tick(&store, entry).await {
                tracing::warn!(schedule = entry.name, error = %e, "could not enqueue the tick; trying again");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

async fn tick(store: &Db, entry: &mut Entry) -> Result<(), schema::StoreError> {
    let now = Utc::now();
    if let Some(due) = latest_tick(&entry.schedule, now)
        && due > entry.done_until
    {
        if let Some(job) = store.enqueue_tick(entry.name, due, false).await? {
            tracing::info!(schedule = entry.name, tick = %due, job = %job, "tick enqueued");
        }
        entry.done_until = due;
    }
    let next = entry.schedule.after(&now).next();
    if next != entry.next {
        store.set_next_run(entry.name, next).await?;
        entry.next = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn the_latest_tick_is_at_or_before_now() {
        let daily = parse_schedule("0 0 2 * * *").unwrap();
        let now = Utc.with_ymd_and_hms(2026, 11, 25, 15, 0, 0).unwrap();
        assert_eq!(
            latest_tick(&daily, now),
            Some(Utc.with_ymd_and_hms(2026, 11, 25, 2, 0, 0).unwrap())
        );
        let exactly = Utc.with_ymd_and_hms(2026, 11, 25, 2, 0, 0).unwrap();
        assert_eq!(latest_tick(&daily, exactly), Some(exactly));
        let five_fields = parse_schedule("*/10 * * * *").unwrap();
        assert_eq!(
            latest_tick(&five_fields, now + chrono::Duration::seconds(65)),
            Some(now)
        );
        assert!(parse_schedule("every tuesday").is_err());
    }
}
