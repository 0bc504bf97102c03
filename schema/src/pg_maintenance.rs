//! Archiving on Postgres (rows to JSON with `to_jsonb`), and the archive files.

use std::{
    io::{Seek, Write},
    path::Path,
};

use chrono::{DateTime, NaiveDate, Utc};

use crate::{PgStore, StoreError, maintenance::ArchiveTable};

/// Rows one archive batch moves.
pub(crate) const ARCHIVE_BATCH: i64 = 1000;

pub(crate) fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
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
    pub(crate) async fn archive_batch(
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
