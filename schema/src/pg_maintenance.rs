//! `Maintenance` on Postgres.

use std::{
    io::{Seek, Write},
    path::Path,
};

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use crate::{
    JobKind, PgStore, ServerRow, StoreError,
    jobs::SYSTEM_USER,
    maintenance::{ArchiveTable, Expired, Maintenance, ScheduleView},
};

/// Rows one archive batch moves.
pub(crate) const ARCHIVE_BATCH: i64 = 1000;

pub(crate) fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

#[async_trait]
impl Maintenance for PgStore {
    async fn register_schedule(
        &self,
        name: &str,
        expression: &str,
        kind: JobKind,
        payload: &serde_json::Value,
    ) -> Result<bool, StoreError> {
        let inserted: bool = sqlx::query_scalar(
            "insert into schedules (name, expression, kind, payload) values ($1, $2, $3, $4) \
             on conflict (name) do update set expression = $2, kind = $3, payload = $4 \
             returning (xmax = 0)",
        )
        .bind(name)
        .bind(expression)
        .bind(kind.as_str())
        .bind(payload)
        .fetch_one(self.pool())
        .await?;
        Ok(inserted)
    }

    async fn set_next_run(&self, name: &str, at: Option<DateTime<Utc>>) -> Result<(), StoreError> {
        sqlx::query("update schedules set next_run_at = $2 where name = $1")
            .bind(name)
            .bind(at)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn schedule_baseline(&self, name: &str) -> Result<DateTime<Utc>, StoreError> {
        Ok(sqlx::query_scalar(
            "select greatest(s.registered_at, (select max(tick) from schedule_runs r \
               where r.schedule = s.name and not r.manual)) \
             from schedules s where s.name = $1",
        )
        .bind(name)
        .fetch_one(self.pool())
        .await?)
    }

    async fn enqueue_tick(
        &self,
        name: &str,
        tick: DateTime<Utc>,
        manual: bool,
    ) -> Result<Option<Uuid>, StoreError> {
        let mut tx = self.pool().begin().await?;
        let Some((kind, payload)) = sqlx::query_as::<_, (String, serde_json::Value)>(
            "select kind, payload from schedules where name = $1",
        )
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Err(StoreError::NotFound(format!("no schedule named {name:?}")));
        };
        let kind: JobKind = serde_json::from_value(serde_json::Value::String(kind))
            .map_err(|e| StoreError::Conflict(format!("schedule {name:?}: {e}")))?;
        let id = Uuid::now_v7();
        // The tick's row first: a replica that loses the race stops here (the
        // unique key), and one that comes late for an older tick too.
        let claimed = sqlx::query(
            "insert into schedule_runs (schedule, tick, manual, job_id) \
             select $1, $2, $3, $4 where $3 or not exists \
               (select 1 from schedule_runs where schedule = $1 and not manual and tick >= $2) \
             on conflict (schedule, tick) do nothing",
        )
        .bind(name)
        .bind(tick)
        .bind(manual)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() == 0 {
            return Ok(None);
        }
        self.insert_job_as(&mut tx, id, kind, SYSTEM_USER, None, payload)
            .await?;
        tx.commit().await?;
        self.queue().flush().await;
        Ok(Some(id))
    }

    async fn schedules(&self) -> Result<Vec<ScheduleView>, StoreError> {
        Ok(sqlx::query_as::<_, ScheduleView>(
            "select s.name, s.expression, s.kind, s.payload, s.next_run_at, \
               r.created_at as last_run_at, r.job_id as last_job_id, j.state as last_state, \
               j.result as last_result, j.last_error \
             from schedules s \
             left join lateral (select * from schedule_runs r where r.schedule = s.name \
               order by r.created_at desc limit 1) r on true \
             left join jobs j on j.id = r.job_id \
             order by s.name",
        )
        .fetch_all(self.pool())
        .await?)
    }

    async fn record_activity(
        &self,
        user: &crate::UserName,
        user_at: Option<DateTime<Utc>>,
        servers: &[(crate::ServerName, DateTime<Utc>)],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        let latest = servers.iter().map(|(_, at)| *at).chain(user_at).max();
        let found = sqlx::query(
            "update users set last_activity = greatest(last_activity, $2) where name = $1",
        )
        .bind(user.as_str())
        .bind(latest)
        .execute(&mut *tx)
        .await?;
        if found.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no user named {user:?}")));
        }
        for (server, at) in servers {
            let found = sqlx::query(
                "update servers s set last_activity = greatest(s.last_activity, $3) \
                 from users u where u.id = s.user_id and u.name = $1 and s.name = $2",
            )
            .bind(user.as_str())
            .bind(server.as_str())
            .bind(at)
            .execute(&mut *tx)
            .await?;
            if found.rows_affected() == 0 {
                return Err(StoreError::NotFound(format!(
                    "user {user:?} has no server {server:?}"
                )));
            }
            sqlx::query(
                "insert into activity_log (user_name, server_name, at) values ($1, $2, $3)",
            )
            .bind(user.as_str())
            .bind(server.as_str())
            .bind(at)
            .execute(&mut *tx)
            .await?;
        }
        if servers.is_empty()
            && let Some(at) = user_at
        {
            sqlx::query("insert into activity_log (user_name, at) values ($1, $2)")
                .bind(user.as_str())
                .bind(at)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn idle_servers(
        &self,
        idle_before: DateTime<Utc>,
        exempt_admins: bool,
    ) -> Result<Vec<ServerRow>, StoreError> {
        crate::reads::pg::idle_servers(self.pool(), idle_before, exempt_admins).await
    }

    async fn warn_old_servers(
        &self,
        started_before: DateTime<Utc>,
        max_age_secs: i64,
        exempt_admins: bool,
    ) -> Result<u64, StoreError> {
        let warned = sqlx::query(
            "update servers s set warned_at = now(), \
               warning = 'this server reaches its maximum age and will be stopped at ' || \
                 to_char((s.started_at + make_interval(secs => $2)) at time zone 'UTC', \
                   'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
             from users u where u.id = s.user_id and s.state = 'running' \
               and s.started_at < $1 and s.warned_at is null and not ($3 and u.role = 'admin')",
        )
        .bind(started_before)
        .bind(max_age_secs as f64)
        .bind(exempt_admins)
        .execute(self.pool())
        .await?;
        Ok(warned.rows_affected())
    }

    async fn expired_servers(
        &self,
        started_before: DateTime<Utc>,
        warned_before: DateTime<Utc>,
        exempt_admins: bool,
    ) -> Result<Vec<ServerRow>, StoreError> {
        crate::reads::pg::expired_servers(self.pool(), started_before, warned_before, exempt_admins)
            .await
    }

    async fn expire_sessions(&self) -> Result<Expired, StoreError> {
        let mut tx = self.pool().begin().await?;
        // A revoked session is kept a day, so that its token reads as revoked
        // (not unknown) in the audit trail of that day.
        let sessions = sqlx::query(
            "delete from sessions where expires_at < now() \
             or revoked_at < now() - interval '1 day'",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let sso_tokens =
            sqlx::query("delete from sso_tokens where expires_at < now() - interval '1 hour'")
                .execute(&mut *tx)
                .await?
                .rows_affected();
        let api_tokens = sqlx::query(
            "delete from api_tokens where revoked_at < now() - interval '1 day' \
             or expires_at < now() - interval '1 day'",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let login_throttle =
            sqlx::query("delete from login_throttle where window_start < now() - interval '1 day'")
                .execute(&mut *tx)
                .await?
                .rows_affected();
        tx.commit().await?;
        Ok(Expired {
            sessions,
            sso_tokens,
            api_tokens,
            login_throttle,
        })
    }

    async fn archive(
        &self,
        table: ArchiveTable,
        before: DateTime<Utc>,
        dir: &Path,
    ) -> Result<u64, StoreError> {
        let mut moved = 0;
        loop {
            let n = self.archive_batch(table, before, dir).await?;
            moved += n;
            if n < ARCHIVE_BATCH as u64 {
                return Ok(moved);
            }
        }
    }

    async fn purge_queue(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let purged = sqlx::query(
            "delete from apalis.jobs where status in ('Done', 'Failed', 'Killed') \
             and coalesce(done_at, run_at) < $1",
        )
        .bind(before)
        .execute(self.pool())
        .await?;
        Ok(purged.rows_affected())
    }

    async fn record_result(&self, job: Uuid, result: &serde_json::Value) -> Result<(), StoreError> {
        sqlx::query("update jobs set result = $2 where id = $1")
            .bind(job)
            .bind(result)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}

/// One row to archive: its id, its day, and the row as JSON.
#[derive(sqlx::FromRow)]
struct ArchivedRow {
    id: String,
    day: NaiveDate,
    line: serde_json::Value,
}

impl PgStore {
    /// One batch: lock the oldest rows, append them to their day's file, then in
    /// the same transaction delete them and record the file's new committed
    /// length. A crash before the commit leaves rows in place and bytes past the
    /// committed length, which the next batch cuts off before appending: nothing
    /// lost, nothing archived twice.
    async fn archive_batch(
        &self,
        table: ArchiveTable,
        before: DateTime<Utc>,
        dir: &Path,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool().begin().await?;
        let select = match table {
            ArchiveTable::Jobs => {
                "select id::text as id, (finished_at at time zone 'UTC')::date as day, \
                   to_jsonb(t) as line from jobs t \
                 where finished_at < $1 and state in ('succeeded', 'failed', 'cancelled') \
                 order by finished_at limit $2 for update skip locked"
            }
            ArchiveTable::AuditLog => {
                "select id::text as id, (at at time zone 'UTC')::date as day, \
                   to_jsonb(t) as line from audit_log t \
                 where at < $1 order by at limit $2 for update skip locked"
            }
            ArchiveTable::ActivityLog => {
                "select id::text as id, (recorded_at at time zone 'UTC')::date as day, \
                   to_jsonb(t) as line from activity_log t \
                 where recorded_at < $1 order by recorded_at limit $2 for update skip locked"
            }
        };
        let rows: Vec<ArchivedRow> = sqlx::query_as(select)
            .bind(before)
            .bind(ARCHIVE_BATCH)
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut by_day: std::collections::BTreeMap<NaiveDate, Vec<&ArchivedRow>> =
            Default::default();
        for row in &rows {
            by_day.entry(row.day).or_default().push(row);
        }
        for (day, day_rows) in by_day {
            let path = dir
                .join(table.as_str())
                .join(format!("{}-{day}.jsonl.gz", table.as_str()));
            // The file's row, locked: one archiver appends to a file at a time.
            let committed: i64 = sqlx::query_scalar(
                "insert into archive_files (table_name, day, path) values ($1, $2, $3) \
                 on conflict (table_name, day) do update set path = excluded.path \
                 returning committed_bytes",
            )
            .bind(table.as_str())
            .bind(day)
            .bind(path.to_string_lossy().as_ref())
            .fetch_one(&mut *tx)
            .await?;
            let lines: Vec<String> = day_rows.iter().map(|r| r.line.to_string()).collect();
            let length = tokio::task::spawn_blocking({
                let path = path.clone();
                move || append_gzip_member(&path, committed as u64, &lines)
            })
            .await
            .map_err(io)??;
            sqlx::query(
                "update archive_files set committed_bytes = $3, rows = rows + $4 \
                 where table_name = $1 and day = $2",
            )
            .bind(table.as_str())
            .bind(day)
            .bind(length as i64)
            .bind(day_rows.len() as i64)
            .execute(&mut *tx)
            .await?;
        }
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let delete = match table {
            ArchiveTable::Jobs => "delete from jobs where id::text = any($1)",
            ArchiveTable::AuditLog => "delete from audit_log where id::text = any($1)",
            ArchiveTable::ActivityLog => "delete from activity_log where id::text = any($1)",
        };
        sqlx::query(delete).bind(&ids).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(rows.len() as u64)
    }
}

/// Cuts the file back to `committed` bytes, appends the lines as one gzip member
/// (concatenated members are one valid gzip stream) and syncs; the new length.
pub(crate) fn append_gzip_member(
    path: &Path,
    committed: u64,
    lines: &[String],
) -> Result<u64, StoreError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io)?;
    file.set_len(committed).map_err(io)?;
    file.seek(std::io::SeekFrom::End(0)).map_err(io)?;
    let mut gz = flate2::write::GzEncoder::new(&mut file, flate2::Compression::default());
    for line in lines {
        gz.write_all(line.as_bytes()).map_err(io)?;
        gz.write_all(b"\n").map_err(io)?;
    }
    gz.finish().map_err(io)?;
    file.sync_all().map_err(io)?;
    file.stream_position().map_err(io)
}
