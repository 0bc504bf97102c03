//! Archiving on SQLite (rows to JSON in Rust).

use std::path::Path;

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::json;

use super::SqliteStore;
use crate::db::json_list;
use crate::{
    JobRow, StoreError,
    accounts::AuditRow,
    maintenance::ArchiveTable,
    pg_maintenance::{ARCHIVE_BATCH, append_gzip_member, io},
};

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
    pub(crate) async fn archive_batch(
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
