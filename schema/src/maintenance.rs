//! The scheduler's side of the store: schedules and their ticks, and what the
//! periodic jobs read and remove (idle servers, expired sessions, old rows).

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::{
    JobKind, ServerRow, StoreError,
    archive::ARCHIVE_BATCH,
    db::{Db, Dialect, each, execute, now},
    jobs::SYSTEM_USER,
};

/// A schedule as registered, with its latest run.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct ScheduleView {
    pub name: String,
    pub expression: String,
    pub kind: String,
    pub next_run_at: Option<DateTime<Utc>>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub last_job_id: Option<Uuid>,
    pub last_state: Option<String>,
    pub last_result: Option<serde_json::Value>,
    pub last_error: Option<String>,
    #[serde(skip)]
    pub payload: serde_json::Value,
}

pub use crate::archive::ArchiveTable;

/// What expiring sessions removed.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Expired {
    pub sessions: u64,
    pub sso_tokens: u64,
    pub api_tokens: u64,
    pub login_throttle: u64,
    /// Sign-ins with a provider never finished, and hand-offs never exchanged.
    pub oidc_flows: u64,
}

#[async_trait]
pub trait Maintenance: Send + Sync + 'static {
    /// Records (or updates) a schedule; true when it was not known before.
    async fn register_schedule(
        &self,
        name: &str,
        expression: &str,
        kind: JobKind,
        payload: &serde_json::Value,
    ) -> Result<bool, StoreError>;
    async fn set_next_run(&self, name: &str, at: Option<DateTime<Utc>>) -> Result<(), StoreError>;
    /// Ticks at or before this need no run: the latest scheduled (not manual) tick
    /// enqueued, or when the schedule was first registered (a new schedule does not
    /// make up ticks from before it existed).
    async fn schedule_baseline(&self, name: &str) -> Result<DateTime<Utc>, StoreError>;
    /// Enqueues the schedule's job for `tick` unless that tick, or a later one, is
    /// already enqueued: a tick runs once, whichever replica gets there first.
    /// Manual runs (an admin's "run now") always enqueue. The job's id, or `None`.
    async fn enqueue_tick(
        &self,
        name: &str,
        tick: DateTime<Utc>,
        manual: bool,
    ) -> Result<Option<Uuid>, StoreError>;
    async fn schedules(&self) -> Result<Vec<ScheduleView>, StoreError>;

    /// Moves the user's and the named servers' last activity forward (never back)
    /// and logs each report; NotFound for an unknown user or server, and then
    /// nothing is written.
    async fn record_activity(
        &self,
        user: &crate::UserName,
        user_at: Option<DateTime<Utc>>,
        servers: &[(crate::ServerName, DateTime<Utc>)],
    ) -> Result<(), StoreError>;
    /// Running servers whose last activity (or start) is before `idle_before`.
    async fn idle_servers(
        &self,
        idle_before: DateTime<Utc>,
        exempt_admins: bool,
    ) -> Result<Vec<ServerRow>, StoreError>;
    /// Running servers idle for longer than their own timeout: their profile's
    /// (`0`: never culled for idleness), else `idle_secs`.
    async fn idle_servers_by_timeout(
        &self,
        at: DateTime<Utc>,
        idle_secs: i64,
        exempt_admins: bool,
    ) -> Result<Vec<ServerRow>, StoreError>;
    /// Warns running servers within `warning_secs` of their maximum age (their
    /// profile's, else `max_age_secs`; 0: no cap) that have no warning yet: they
    /// will be stopped at start + maximum age. How many were warned.
    async fn warn_old_servers(
        &self,
        at: DateTime<Utc>,
        max_age_secs: i64,
        warning_secs: i64,
        exempt_admins: bool,
    ) -> Result<u64, StoreError>;
    /// Running servers past their maximum age (as for the warning) whose warning
    /// is at least `warning_secs` old.
    async fn expired_servers(
        &self,
        at: DateTime<Utc>,
        max_age_secs: i64,
        warning_secs: i64,
        exempt_admins: bool,
    ) -> Result<Vec<ServerRow>, StoreError>;
    async fn expire_sessions(&self) -> Result<Expired, StoreError>;
    /// Moves rows of `table` older than `before` into gzip JSON-lines files under
    /// `dir` (one per table and day), batch by batch; how many rows it moved.
    async fn archive(
        &self,
        table: ArchiveTable,
        before: DateTime<Utc>,
        dir: &std::path::Path,
    ) -> Result<u64, StoreError>;
    /// Removes the queue backend's own records of jobs finished before `before`.
    async fn purge_queue(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;
    /// Keeps what a job did on its row.
    async fn record_result(&self, job: Uuid, result: &serde_json::Value) -> Result<(), StoreError>;
}

#[async_trait]
impl Maintenance for Db {
    async fn register_schedule(
        &self,
        name: &str,
        expression: &str,
        kind: JobKind,
        payload: &serde_json::Value,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let existed: bool = each!(tx.conn(), c => sqlx::query_scalar(
            "select exists (select 1 from schedules where name = $1)",
        )
        .bind(name)
        .fetch_one(c)
        .await)?;
        execute!(
            tx.conn(),
            "insert into schedules (name, expression, kind, payload, registered_at) \
             values ($1, $2, $3, $4, $5) \
             on conflict (name) do update set expression = $2, kind = $3, payload = $4",
            name,
            expression,
            kind.as_str(),
            payload,
            now()
        )?;
        tx.commit().await?;
        Ok(!existed)
    }

    async fn set_next_run(&self, name: &str, at: Option<DateTime<Utc>>) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        execute!(
            tx.conn(),
            "update schedules set next_run_at = $2 where name = $1",
            name,
            at
        )?;
        tx.commit().await
    }

    async fn schedule_baseline(&self, name: &str) -> Result<DateTime<Utc>, StoreError> {
        let (registered, last): (DateTime<Utc>, Option<DateTime<Utc>>) = each!(self.pool(), p => sqlx::query_as(
                "select s.registered_at, (select max(tick) from schedule_runs r \
                   where r.schedule = s.name and not r.manual) \
                 from schedules s where s.name = $1",
            )
            .bind(name)
            .fetch_one(p)
            .await)?;
        Ok(last.map_or(registered, |last| last.max(registered)))
    }

    async fn enqueue_tick(
        &self,
        name: &str,
        tick: DateTime<Utc>,
        manual: bool,
    ) -> Result<Option<Uuid>, StoreError> {
        let mut tx = self.begin().await?;
        let schedule: Option<(JobKind, serde_json::Value)> = each!(tx.conn(), c => sqlx::query_as(
            "select kind, payload from schedules where name = $1",
        )
        .bind(name)
        .fetch_optional(c)
        .await)?;
        let Some((kind, payload)) = schedule else {
            return Err(StoreError::NotFound(format!("no schedule named {name:?}")));
        };
        let id = Uuid::now_v7();
        // The tick's row first: a replica that loses the race stops here (the
        // unique key), and one that comes late for an older tick too.
        let claimed = execute!(
            tx.conn(),
            "insert into schedule_runs (schedule, tick, manual, job_id, created_at) \
             select $1, $2, $3, $4, $5 where $3 or not exists \
               (select 1 from schedule_runs where schedule = $1 and not manual and tick >= $2) \
             on conflict (schedule, tick) do nothing",
            name,
            tick,
            manual,
            id,
            now()
        )?;
        if claimed == 0 {
            return Ok(None);
        }
        self.insert_job_as(&mut tx, id, kind, SYSTEM_USER, None, payload)
            .await?;
        tx.commit().await?;
        Ok(Some(id))
    }

    async fn schedules(&self) -> Result<Vec<ScheduleView>, StoreError> {
        Ok(each!(self.pool(), p => sqlx::query_as::<_, ScheduleView>(
            "select s.name, s.expression, s.kind, s.payload, s.next_run_at, \
               r.created_at as last_run_at, r.job_id as last_job_id, j.state as last_state, \
               j.result as last_result, j.last_error \
             from schedules s \
             left join schedule_runs r on r.id = (select x.id from schedule_runs x \
               where x.schedule = s.name order by x.created_at desc, x.id desc limit 1) \
             left join jobs j on j.id = r.job_id \
             order by s.name",
        )
        .fetch_all(p)
        .await)?)
    }

    async fn record_activity(
        &self,
        user: &crate::UserName,
        user_at: Option<DateTime<Utc>>,
        servers: &[(crate::ServerName, DateTime<Utc>)],
    ) -> Result<(), StoreError> {
        let recorded = now();
        let mut tx = self.begin().await?;
        let latest = servers.iter().map(|(_, at)| *at).chain(user_at).max();
        // Only forward: the later of the two, whichever is null.
        let found = execute!(
            tx.conn(),
            "update users set last_activity = case when last_activity is null \
               or last_activity < $2 then $2 else last_activity end where name = $1",
            user.as_str(),
            latest
        )?;
        if found == 0 {
            return Err(StoreError::no_user(user));
        }
        for (server, at) in servers {
            let found = execute!(
                tx.conn(),
                "update servers set last_activity = case when last_activity is null \
                   or last_activity < $3 then $3 else last_activity end \
                 where name = $2 and user_id = (select id from users where name = $1)",
                user.as_str(),
                server.as_str(),
                at
            )?;
            if found == 0 {
                return Err(StoreError::NotFound(format!(
                    "user {user:?} has no server {server:?}"
                )));
            }
            execute!(
                tx.conn(),
                "insert into activity_log (user_name, server_name, at, recorded_at) \
                 values ($1, $2, $3, $4)",
                user.as_str(),
                server.as_str(),
                at,
                recorded
            )?;
        }
        if servers.is_empty()
            && let Some(at) = user_at
        {
            execute!(
                tx.conn(),
                "insert into activity_log (user_name, at, recorded_at) values ($1, $2, $3)",
                user.as_str(),
                at,
                recorded
            )?;
        }
        tx.commit().await
    }

    async fn idle_servers(
        &self,
        idle_before: DateTime<Utc>,
        exempt_admins: bool,
    ) -> Result<Vec<ServerRow>, StoreError> {
        Ok(
            each!(self.pool(), p => sqlx::query_as::<_, ServerRow>(select_servers!(
            "where s.state = 'running' and coalesce(s.last_activity, s.started_at) < $1 \
             and not ($2 and u.role = 'admin')"
        ))
        .bind(idle_before)
        .bind(exempt_admins)
        .fetch_all(p)
        .await)?,
        )
    }

    async fn idle_servers_by_timeout(
        &self,
        at: DateTime<Utc>,
        idle_secs: i64,
        exempt_admins: bool,
    ) -> Result<Vec<ServerRow>, StoreError> {
        // Those of the default timeout by the index; those with a timeout of their
        // own (a profile's, few) are all read and decided here.
        let mut rows = each!(self.pool(), p => sqlx::query_as::<_, ServerRow>(select_servers!(
            "where s.state = 'running' and not ($2 and u.role = 'admin') \
             and (s.idle_timeout_secs is not null or coalesce(s.last_activity, s.started_at) < $1)"
        ))
        .bind(at - TimeDelta::seconds(idle_secs))
        .bind(exempt_admins)
        .fetch_all(p)
        .await)?;
        rows.retain(|row| {
            let secs = row.idle_timeout_secs.unwrap_or(idle_secs);
            secs > 0
                && row
                    .last_activity
                    .or(row.started_at)
                    .is_some_and(|last| last < at - TimeDelta::seconds(secs))
        });
        Ok(rows)
    }

    async fn warn_old_servers(
        &self,
        at: DateTime<Utc>,
        max_age_secs: i64,
        warning_secs: i64,
        exempt_admins: bool,
    ) -> Result<u64, StoreError> {
        let written = now();
        let mut tx = self.begin().await?;
        let candidates: Vec<(i64, DateTime<Utc>, Option<i64>)> = each!(tx.conn(), c => sqlx::query_as(
            "select s.id, s.started_at, s.max_age_secs from servers s join users u on u.id = s.user_id \
             where s.state = 'running' and s.warned_at is null and s.started_at is not null \
             and not ($1 and u.role = 'admin') and (s.max_age_secs is not null or $2)",
        )
        .bind(exempt_admins)
        .bind(max_age_secs > 0)
        .fetch_all(c)
        .await)?;
        let mut warned = 0;
        for (id, started, own) in &candidates {
            let max_age = own.unwrap_or(max_age_secs);
            if max_age <= 0
                || *started >= at - TimeDelta::seconds(max_age - warning_secs.min(max_age))
            {
                continue;
            }
            let stop_at =
                (*started + TimeDelta::seconds(max_age)).to_rfc3339_opts(SecondsFormat::Secs, true);
            let warning =
                format!("this server reaches its maximum age and will be stopped at {stop_at}");
            execute!(
                tx.conn(),
                "update servers set warned_at = $2, warning = $3 where id = $1",
                id,
                written,
                &warning
            )?;
            warned += 1;
        }
        tx.commit().await?;
        Ok(warned)
    }

    async fn expired_servers(
        &self,
        at: DateTime<Utc>,
        max_age_secs: i64,
        warning_secs: i64,
        exempt_admins: bool,
    ) -> Result<Vec<ServerRow>, StoreError> {
        let mut rows = each!(self.pool(), p => sqlx::query_as::<_, ServerRow>(select_servers!(
            "where s.state = 'running' and s.warned_at < $1 and not ($2 and u.role = 'admin') \
             and (s.max_age_secs is not null or $3)"
        ))
        .bind(at - TimeDelta::seconds(warning_secs))
        .bind(exempt_admins)
        .bind(max_age_secs > 0)
        .fetch_all(p)
        .await)?;
        rows.retain(|row| {
            let max_age = row.max_age_secs.unwrap_or(max_age_secs);
            max_age > 0
                && row
                    .started_at
                    .is_some_and(|started| started < at - TimeDelta::seconds(max_age))
        });
        Ok(rows)
    }

    async fn expire_sessions(&self) -> Result<Expired, StoreError> {
        let at = now();
        let (day, hour) = (at - TimeDelta::days(1), at - TimeDelta::hours(1));
        let mut tx = self.begin().await?;
        // A revoked session is kept a day, so that its token reads as revoked
        // (not unknown) in the audit trail of that day.
        let sessions = execute!(
            tx.conn(),
            "delete from sessions where expires_at < $1 or revoked_at < $2",
            at,
            day
        )?;
        let sso_tokens = execute!(
            tx.conn(),
            "delete from sso_tokens where expires_at < $1",
            hour
        )?;
        let api_tokens = execute!(
            tx.conn(),
            "delete from api_tokens where revoked_at < $1 or expires_at < $1",
            day
        )?;
        let login_throttle = execute!(
            tx.conn(),
            "delete from login_throttle where window_start < $1",
            day
        )?;
        let oidc_flows = execute!(
            tx.conn(),
            "delete from oidc_flows where expires_at < $1",
            at
        )?;
        tx.commit().await?;
        Ok(Expired {
            sessions,
            sso_tokens,
            api_tokens,
            login_throttle,
            oidc_flows,
        })
    }

    async fn archive(
        &self,
        table: ArchiveTable,
        before: DateTime<Utc>,
        dir: &std::path::Path,
    ) -> Result<u64, StoreError> {
        let mut moved = 0;
        loop {
            let n = crate::archive::batch(self, table, before, dir).await?;
            moved += n;
            if n < ARCHIVE_BATCH as u64 {
                return Ok(moved);
            }
        }
    }

    async fn purge_queue(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let purged = match tx.conn() {
            Dialect::Pg(p) => sqlx::query(
                "delete from apalis.jobs where status in ('Done', 'Failed', 'Killed') \
                 and coalesce(done_at, run_at) < $1",
            )
            .bind(before)
            .execute(p)
            .await?
            .rows_affected(),
            // A queue entry goes when its job ends; only an entry whose job was ended
            // another way (an operator's cancel of a job already handed out) stays.
            Dialect::Lite(p) => sqlx::query(
                "delete from queue where taken_by is null and job_id in \
                 (select id from jobs where state in ('succeeded', 'failed', 'cancelled'))",
            )
            .execute(p)
            .await?
            .rows_affected(),
        };
        tx.commit().await?;
        Ok(purged)
    }

    async fn record_result(&self, job: Uuid, result: &serde_json::Value) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        execute!(
            tx.conn(),
            "update jobs set result = $2 where id = $1",
            job,
            result
        )?;
        tx.commit().await
    }
}
