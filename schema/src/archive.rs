//! Archiving: old finished jobs, audit and activity rows move to one gzip JSON
//! Lines file per table and day. The batch is written once; only how a row becomes
//! JSON (`to_jsonb` on Postgres, in Rust on SQLite) and how its key is matched on
//! delete differ by dialect.

use std::{
    io::{Seek, Write},
    path::Path,
};

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::json;

use crate::{
    JobRow, StoreError,
    accounts::AuditRow,
    db::{Db, Dialect, Tx, each, execute, json_list},
};

/// The tables archiving moves to files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArchiveTable {
    /// Finished jobs, by `finished_at`.
    Jobs,
    /// The audit log, by `at`.
    AuditLog,
    /// Activity reports, by `recorded_at`.
    ActivityLog,
}

impl ArchiveTable {
    pub const ALL: [ArchiveTable; 3] = [Self::Jobs, Self::AuditLog, Self::ActivityLog];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jobs => "jobs",
            Self::AuditLog => "audit_log",
            Self::ActivityLog => "activity_log",
        }
    }
}

/// Rows one archive batch moves.
pub(crate) const ARCHIVE_BATCH: i64 = 1000;

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// One row to archive: its key, its day, and the row as JSON.
struct ArchivedRow {
    key: serde_json::Value,
    day: NaiveDate,
    line: serde_json::Value,
}

/// A row as Postgres turns it into JSON.
#[derive(sqlx::FromRow)]
struct PgArchivedRow {
    id: String,
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

/// One batch: take the oldest rows (locked on Postgres), append them to their
/// day's file, then in the same transaction delete them and record the file's new
/// committed length. A crash before the commit leaves rows in place and bytes past
/// the committed length, which the next batch cuts off before appending: nothing
/// lost, nothing archived twice.
pub(crate) async fn batch(
    db: &Db,
    table: ArchiveTable,
    before: DateTime<Utc>,
    dir: &Path,
) -> Result<u64, StoreError> {
    let mut tx = db.begin().await?;
    let rows = oldest(&mut tx, table, before).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut by_day: std::collections::BTreeMap<NaiveDate, Vec<&ArchivedRow>> = Default::default();
    for row in &rows {
        by_day.entry(row.day).or_default().push(row);
    }
    for (day, day_rows) in by_day {
        let path = dir
            .join(table.as_str())
            .join(format!("{}-{day}.jsonl.gz", table.as_str()));
        // The file's row, locked on Postgres: one archiver appends to a file at a time.
        let committed: i64 = each!(tx.conn(), c => sqlx::query_scalar(
            "insert into archive_files (table_name, day, path) values ($1, $2, $3) \
             on conflict (table_name, day) do update set path = excluded.path \
             returning committed_bytes",
        )
        .bind(table.as_str())
        .bind(day)
        .bind(path.to_string_lossy().as_ref())
        .fetch_one(c)
        .await)?;
        let lines: Vec<String> = day_rows.iter().map(|r| r.line.to_string()).collect();
        let length = tokio::task::spawn_blocking({
            let path = path.clone();
            move || append_gzip_member(&path, committed as u64, &lines)
        })
        .await
        .map_err(io)??;
        execute!(
            tx.conn(),
            "update archive_files set committed_bytes = $3, rows = rows + $4 \
             where table_name = $1 and day = $2",
            table.as_str(),
            day,
            length as i64,
            day_rows.len() as i64
        )?;
    }
    let keys: Vec<&serde_json::Value> = rows.iter().map(|r| &r.key).collect();
    match tx.conn() {
        Dialect::Pg(c) => {
            let keys: Vec<&str> = keys.iter().filter_map(|k| k.as_str()).collect();
            let delete = match table {
                ArchiveTable::Jobs => "delete from jobs where id::text = any($1)",
                ArchiveTable::AuditLog => "delete from audit_log where id::text = any($1)",
                ArchiveTable::ActivityLog => "delete from activity_log where id::text = any($1)",
            };
            sqlx::query(delete).bind(&keys).execute(c).await?;
        }
        Dialect::Lite(c) => {
            let delete = match table {
                // Job ids are blobs; their JSON form is the hyphenated text.
                ArchiveTable::Jobs => {
                    "delete from jobs where id in \
                       (select unhex(replace(value, '-', '')) from json_each($1))"
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
                .execute(c)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(rows.len() as u64)
}

/// The oldest rows of `table` from before `before`, at most a batch.
async fn oldest(
    tx: &mut Tx,
    table: ArchiveTable,
    before: DateTime<Utc>,
) -> Result<Vec<ArchivedRow>, StoreError> {
    Ok(match tx.conn() {
        Dialect::Pg(c) => {
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
            sqlx::query_as::<_, PgArchivedRow>(select)
                .bind(before)
                .bind(ARCHIVE_BATCH)
                .fetch_all(c)
                .await?
                .into_iter()
                .map(|r| ArchivedRow {
                    key: json!(r.id),
                    day: r.day,
                    line: r.line,
                })
                .collect()
        }
        // The same fields as Postgres's `to_jsonb`, made in Rust.
        Dialect::Lite(c) => match table {
            ArchiveTable::Jobs => sqlx::query_as::<_, JobRow>(
                "select * from jobs where finished_at < $1 \
                 and state in ('succeeded', 'failed', 'cancelled') order by finished_at limit $2",
            )
            .bind(before)
            .bind(ARCHIVE_BATCH)
            .fetch_all(c)
            .await?
            .into_iter()
            .map(|j| ArchivedRow {
                key: json!(j.id),
                day: j.finished_at.unwrap_or(j.created_at).date_naive(),
                line: json!({
                    "id": j.id, "kind": j.kind, "state": j.state, "user_name": j.user_name,
                    "server_name": j.server_name, "payload": j.payload, "attempts": j.attempts,
                    "last_error": j.last_error, "worker": j.worker, "created_at": j.created_at,
                    "started_at": j.started_at, "finished_at": j.finished_at, "result": j.result,
                    "retry_of": j.retry_of,
                }),
            })
            .collect(),
            ArchiveTable::AuditLog => sqlx::query_as::<_, AuditRow>(
                "select * from audit_log where at < $1 order by at limit $2",
            )
            .bind(before)
            .bind(ARCHIVE_BATCH)
            .fetch_all(c)
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
            .fetch_all(c)
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
        },
    })
}

/// Cuts the file back to `committed` bytes, appends the lines as one gzip member
/// (concatenated members are one valid gzip stream) and syncs; the new length.
fn append_gzip_member(path: &Path, committed: u64, lines: &[String]) -> Result<u64, StoreError> {
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
