//! `Maintenance` on SQLite.

use std::path::Path;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, SecondsFormat, TimeDelta, Utc};
use serde_json::json;
use uuid::Uuid;

use super::{SqliteStore, json_list, now};
use crate::{
    JobKind, JobRow, ServerRow, StoreError,
    accounts::AuditRow,
    jobs::SYSTEM_USER,
    maintenance::{ArchiveTable, Expired, Maintenance, ScheduleView},
    pg_maintenance::{ARCHIVE_BATCH, append_gzip_member, io},
};

#[async_trait]
impl Maintenance for SqliteStore {
    async fn register_schedule(
        &self,
        name: &str,
        expression: &str,
        kind: JobKind,
        payload: &serde_json::Value,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let existed: bool =
            sqlx::query_scalar("select exists (select 1 from schedules where name = $1)")
                .bind(name)
                .fetch_one(&mut *tx.tx)
                .await?;
        sqlx::query(
            "insert into schedules (name, expression, kind, payload, registered_at) \
             values ($1, $2, $3, $4, $5) \
             on conflict (name) do update set expression = $2, kind = $3, payload = $4",
        )
        .bind(name)
        .bind(expression)
        .bind(kind.as_str())
        .bind(payload)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        self.commit(tx).await?;
        Ok(!existed)
    }

    async fn set_next_run(&self, name: &str, at: Option<DateTime<Utc>>) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query("update schedules set next_run_at = $2 where name = $1")
            .bind(name)
            .bind(at)
            .execute(&mut *tx.tx)
            .await?;
        self.commit(tx).await
    }

    async fn schedule_baseline(&self, name: &str) -> Result<DateTime<Utc>, StoreError> {
        let (registered, last): (DateTime<Utc>, Option<DateTime<Utc>>) = sqlx::query_as(
            "select s.registered_at, (select max(tick) from schedule_runs r \
               where r.schedule = s.name and not r.manual) \
             from schedules s where s.name = $1",
        )
        .bind(name)
        .fetch_one(self.pool())
        .await?;
        Ok(last.map_or(registered, |last| last.max(registered)))
    }

    async fn enqueue_tick(
        &self,
        name: &str,
        tick: DateTime<Utc>,
        manual: bool,
    ) -> Result<Option<Uuid>, StoreError> {
        let mut tx = self.write().await?;
        let Some((kind, payload)) = sqlx::query_as::<_, (String, serde_json::Value)>(
            "select kind, payload from schedules where name = $1",
        )
        .bind(name)
        .fetch_optional(&mut *tx.tx)
        .await?
        else {
            return Err(StoreError::NotFound(format!("no schedule named {name:?}")));
        };
        let kind: JobKind = serde_json::from_value(serde_json::Value::String(kind))
            .map_err(|e| StoreError::Conflict(format!("schedule {name:?}: {e}")))?;
        let id = Uuid::now_v7();
        let claimed = sqlx::query(
            "insert into schedule_runs (schedule, tick, manual, job_id, created_at) \
             select $1, $2, $3, $4, $5 where $3 or not exists \
               (select 1 from schedule_runs where schedule = $1 and not manual and tick >= $2) \
             on conflict (schedule, tick) do nothing",
        )
        .bind(name)
        .bind(tick)
        .bind(manual)
        .bind(id)
        .bind(now())
        .execute(&mut *tx.tx)
        .await?;
        if claimed.rows_affected() == 0 {
            return Ok(None);
        }
        self.insert_job_as(&mut tx, id, kind, SYSTEM_USER, None, payload)
            .await?;
        self.commit(tx).await?;
        Ok(Some(id))
    }

    async fn schedules(&self) -> Result<Vec<ScheduleView>, StoreError> {
        Ok(sqlx::query_as::<_, ScheduleView>(
            "select s.name, s.expression, s.kind, s.payload, s.next_run_at, \
               r.created_at as last_run_at, r.job_id as last_job_id, j.state as last_state, \
               j.result as last_result, j.last_error \
             from schedules s \
             left join schedule_runs r on r.id = (select x.id from schedule_runs x \
               where x.schedule = s.name order by x.created_at desc, x.id desc limit 1) \
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
        let recorded = now();
        let mut tx = self.write().await?;
        let latest = servers.iter().map(|(_, at)| *at).chain(user_at).max();
        // `max` of SQLite is null when any argument is: hence the coalesces.
        let found = sqlx::query(
            "update users set last_activity = max(coalesce(last_activity, $2), coalesce($2, last_activity)) \
             where name = $1",
        )
        .bind(user.as_str())
        .bind(latest)
        .execute(&mut *tx.tx)
        .await?;
        if found.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no user named {user:?}")));
        }
        for (server, at) in servers {
            let found = sqlx::query(
                "update servers set last_activity = max(coalesce(last_activity, $3), $3) \
                 where name = $2 and user_id = (select id from users where name = $1)",
            )
            .bind(user.as_str())
            .bind(server.as_str())
            .bind(at)
            .execute(&mut *tx.tx)
            .await?;
            if found.rows_affected() == 0 {
                return Err(StoreError::NotFound(format!(
                    "user {user:?} has no server {server:?}"
                )));
            }
            sqlx::query(
                "insert into activity_log (user_name, server_name, at, recorded_at) \
                 values ($1, $2, $3, $4)",
            )
            .bind(user.as_str())
            .bind(server.as_str())
            .bind(at)
            .bind(recorded)
            .execute(&mut *tx.tx)
            .await?;
        }
        if servers.is_empty()
            && let Some(at) = user_at
        {
            sqlx::query(
                "insert into activity_log (user_name, at, recorded_at) values ($1, $2, $3)",
            )
            .bind(user.as_str())
            .bind(at)
            .bind(recorded)
            .execute(&mut *tx.tx)
            .await?;
        }
        self.commit(tx).await
    }

    async fn idle_servers(
        &self,
        idle_before: DateTime<Utc>,
        exempt_admins: bool,
    ) -> Result<Vec<ServerRow>, StoreError> {
        crate::reads::lite::idle_servers(self.pool(), idle_before, exempt_admins).await
    }

    async fn warn_old_servers(
        &self,
        started_before: DateTime<Utc>,
        max_age_secs: i64,
        exempt_admins: bool,
    ) -> Result<u64, StoreError> {
        let at = now();
        let mut tx = self.write().await?;
        let due: Vec<(i64, DateTime<Utc>)> = sqlx::query_as(
            "select s.id, s.started_at from servers s join users u on u.id = s.user_id \
             where s.state = 'running' and s.started_at < $1 and s.warned_at is null \
             and not ($2 and u.role = 'admin')",
        )
        .bind(started_before)
        .bind(exempt_admins)
        .fetch_all(&mut *tx.tx)
        .await?;
        for (id, started) in &due {
            let stop_at = (*started + TimeDelta::seconds(max_age_secs))
                .to_rfc3339_opts(SecondsFormat::Secs, true);
            sqlx::query("update servers set warned_at = $2, warning = $3 where id = $1")
                .bind(id)
                .bind(at)
                .bind(format!(
                    "this server reaches its maximum age and will be stopped at {stop_at}"
                ))
                .execute(&mut *tx.tx)
                .await?;
        }
        self.commit(tx).await?;
        Ok(due.len() as u64)
    }

    async fn expired_servers(
        &self,
        started_before: DateTime<Utc>,
        warned_before: DateTime<Utc>,
        exempt_admins: bool,
    ) -> Result<Vec<ServerRow>, StoreError> {
        crate::reads::lite::expired_servers(
            self.pool(),
            started_before,
            warned_before,
            exempt_admins,
        )
        .await
    }

    async fn expire_sessions(&self) -> Result<Expired, StoreError> {
        let at = now();
        let (day, hour) = (at - TimeDelta::days(1), at - TimeDelta::hours(1));
        let mut tx = self.write().await?;
        let sessions = sqlx::query("delete from sessions where expires_at < $1 or revoked_at < $2")
            .bind(at)
            .bind(day)
            .execute(&mut *tx.tx)
            .await?
            .rows_affected();
        let sso_tokens = sqlx::query("delete from sso_tokens where expires_at < $1")
            .bind(hour)
            .execute(&mut *tx.tx)
            .await?
            .rows_affected();
        let api_tokens =
            sqlx::query("delete from api_tokens where revoked_at < $1 or expires_at < $1")
                .bind(day)
                .execute(&mut *tx.tx)
                .await?
                .rows_affected();
        let login_throttle = sqlx::query("delete from login_throttle where window_start < $1")
            .bind(day)
            .execute(&mut *tx.tx)
            .await?
            .rows_affected();
        self.commit(tx).await?;
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

    async fn purge_queue(&self, _before: DateTime<Utc>) -> Result<u64, StoreError> {
        // A queue entry goes when its job ends; only an entry whose job was ended
        // another way (an operator's cancel of a job already handed out) stays.
        let mut tx = self.write().await?;
        let purged = sqlx::query(
            "delete from queue where taken_by is null and job_id in \
             (select id from jobs where state in ('succeeded', 'failed', 'cancelled'))",
        )
        .execute(&mut *tx.tx)
        .await?;
        self.commit(tx).await?;
        Ok(purged.rows_affected())
    }

    async fn record_result(&self, job: Uuid, result: &serde_json::Value) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query("update jobs set result = $2 where id = $1")
            .bind(job)
            .bind(result)
            .execute(&mut *tx.tx)
            .await?;
        self.commit(tx).await
    }
}

/// One row to archive: its key, its day, and the row as JSON (as on Postgres).
struct ArchivedRow {
    key: serde_json::Value,
    day: NaiveDate,
    line: serde_json::Value,
}

#[derive(sqlx::FromRow)]
struct ActivityRow {
    id: i64,
    user_name: String,
    server_name: Option<String>,
    at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
}

fn job_line(j: JobRow) -> ArchivedRow {
    let day = j.finished_at.unwrap_or(j.created_at).date_naive();
    ArchivedRow {
        key: json!(j.id),
        day,
        line: json!({
            "id": j.id, "kind": j.kind, "state": j.state, "user_name": j.user_name,
            "server_name": j.server_name, "payload": j.payload, "attempts": j.attempts,
            "last_error": j.last_error, "worker": j.worker, "created_at": j.created_at,
            "started_at": j.started_at, "finished_at": j.finished_at, "result": j.result,
            "retry_of": j.retry_of,
        }),
    }
}

impl SqliteStore {
    /// One batch, as on Postgres: append the oldest rows to their day's file,
    /// then delete them and record the file's committed length in one transaction.
    async fn archive_batch(
        &self,
        table: ArchiveTable,
        before: DateTime<Utc>,
        dir: &Path,
    ) -> Result<u64, StoreError> {
        let mut tx = self.write().await?;
        let rows: Vec<ArchivedRow> = match table {
            ArchiveTable::Jobs => sqlx::query_as::<_, JobRow>(
                "select * from jobs where finished_at < $1 \
                 and state in ('succeeded', 'failed', 'cancelled') order by finished_at limit $2",
            )
            .bind(before)
            .bind(ARCHIVE_BATCH)
            .fetch_all(&mut *tx.tx)
            .await?
            .into_iter()
            .map(job_line)
            .collect(),
            ArchiveTable::AuditLog => sqlx::query_as::<_, AuditRow>(
                "select * from audit_log where at < $1 order by at limit $2",
            )
            .bind(before)
            .bind(ARCHIVE_BATCH)
            .fetch_all(&mut *tx.tx)
            .await?
            .into_iter()
            .map(|a| ArchivedRow {
                key: json!(a.id),
                day: a.at.date_naive(),
                line: json!({
                    "id": a.id, "at": a.at, "actor": a.actor, "action": a.action,
                    "target": a.target, "client_addr": a.client_addr, "detail": a.detail,
                }),
            })
            .collect(),
            ArchiveTable::ActivityLog => sqlx::query_as::<_, ActivityRow>(
                "select * from activity_log where recorded_at < $1 order by recorded_at limit $2",
            )
            .bind(before)
            .bind(ARCHIVE_BATCH)
            .fetch_all(&mut *tx.tx)
            .await?
            .into_iter()
            .map(|a| ArchivedRow {
                key: json!(a.id),
                day: a.recorded_at.date_naive(),
                line: json!({
                    "id": a.id, "user_name": a.user_name, "server_name": a.server_name,
                    "at": a.at, "recorded_at": a.recorded_at,
                }),
            })
            .collect(),
        };
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
            let day_text = day.to_string();
            let committed: i64 = sqlx::query_scalar(
                "insert into archive_files (table_name, day, path) values ($1, $2, $3) \
                 on conflict (table_name, day) do update set path = excluded.path \
                 returning committed_bytes",
            )
            .bind(table.as_str())
            .bind(&day_text)
            .bind(path.to_string_lossy().as_ref())
            .fetch_one(&mut *tx.tx)
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
            .bind(&day_text)
            .bind(length as i64)
            .bind(day_rows.len() as i64)
            .execute(&mut *tx.tx)
            .await?;
        }
        let keys: Vec<&serde_json::Value> = rows.iter().map(|r| &r.key).collect();
        let delete = match table {
            // Job ids are blobs; their JSON form is the hyphenated text.
            ArchiveTable::Jobs => {
                "delete from jobs where id in (select unhex(replace(value, '-', '')) from json_each($1))"
            }
            ArchiveTable::AuditLog => {
                "delete from audit_log where id in (select value from json_each($1))"
            }
            ArchiveTable::ActivityLog => {
                "delete from activity_log where id in (select value from json_each($1))"
            }
        };
        sqlx::query(delete)
            .bind(json_list(&keys))
            .execute(&mut *tx.tx)
            .await?;
        self.commit(tx).await?;
        Ok(rows.len() as u64)
    }
}
