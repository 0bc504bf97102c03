//! Reads whose SQL is the same on Postgres and on SQLite, written once and made
//! for each store's pool (`reads::pg`, `reads::lite`); the stores' trait methods
//! call them. What differs between the dialects (writes, times, arrays, locks)
//! stays in each store.

macro_rules! shared_reads {
    ($db:ty) => {
        type Pool = sqlx::Pool<$db>;
        type QueryAs<'q, O> = sqlx::query::QueryAs<'q, $db, O, <$db as sqlx::Database>::Arguments>;

        use chrono::{DateTime, Utc};
        use uuid::Uuid;

        use crate::{
            accounts::{AuditRow, Page},
            console::{JobCount, JobFilter, SpawnEvent, StateCount},
            jobs::JobRow,
            names::{ServerName, UserName},
            platform::{LimitOverrides, WorkerRow},
            rows::{ServerRow, UserRow},
            store::StoreError,
        };

        pub(crate) async fn get_user(
            pool: &Pool,
            name: &UserName,
        ) -> Result<Option<UserRow>, StoreError> {
            Ok(
                sqlx::query_as::<_, UserRow>("select * from users where name = $1")
                    .bind(name.as_str())
                    .fetch_optional(pool)
                    .await?,
            )
        }

        pub(crate) async fn user_by_id(
            pool: &Pool,
            id: i64,
        ) -> Result<Option<UserRow>, StoreError> {
            Ok(
                sqlx::query_as::<_, UserRow>("select * from users where id = $1")
                    .bind(id)
                    .fetch_optional(pool)
                    .await?,
            )
        }

        /// By name, or by email (any case) when the login has an `@`.
        pub(crate) async fn find_login(
            pool: &Pool,
            login: &str,
        ) -> Result<Option<UserRow>, StoreError> {
            let sql = if login.contains('@') {
                "select * from users where lower(email) = lower($1)"
            } else {
                "select * from users where name = $1"
            };
            Ok(sqlx::query_as::<_, UserRow>(sql)
                .bind(login)
                .fetch_optional(pool)
                .await?)
        }

        pub(crate) async fn list_users(pool: &Pool) -> Result<Vec<UserRow>, StoreError> {
            Ok(
                sqlx::query_as::<_, UserRow>("select * from users order by name")
                    .fetch_all(pool)
                    .await?,
            )
        }

        pub(crate) async fn get_server(
            pool: &Pool,
            user: &UserName,
            server: &ServerName,
        ) -> Result<Option<ServerRow>, StoreError> {
            Ok(
                sqlx::query_as::<_, ServerRow>(select_servers!(
                    "where u.name = $1 and s.name = $2"
                ))
                .bind(user.as_str())
                .bind(server.as_str())
                .fetch_optional(pool)
                .await?,
            )
        }

        pub(crate) async fn server_by_id(
            pool: &Pool,
            id: i64,
        ) -> Result<Option<ServerRow>, StoreError> {
            Ok(
                sqlx::query_as::<_, ServerRow>(select_servers!("where s.id = $1"))
                    .bind(id)
                    .fetch_optional(pool)
                    .await?,
            )
        }

        /// The running server a server's own token belongs to.
        pub(crate) async fn server_by_token(
            pool: &Pool,
            token_hash: &str,
        ) -> Result<Option<ServerRow>, StoreError> {
            Ok(sqlx::query_as::<_, ServerRow>(select_servers!(
                "where s.token_hash = $1 and s.state = 'running'"
            ))
            .bind(token_hash)
            .fetch_optional(pool)
            .await?)
        }

        pub(crate) async fn live_servers(pool: &Pool) -> Result<Vec<ServerRow>, StoreError> {
            Ok(sqlx::query_as::<_, ServerRow>(select_servers!(
                "where s.state in ('pending_spawn', 'running', 'pending_stop')"
            ))
            .fetch_all(pool)
            .await?)
        }

        /// Running servers without activity since `idle_before`.
        pub(crate) async fn idle_servers(
            pool: &Pool,
            idle_before: DateTime<Utc>,
            exempt_admins: bool,
        ) -> Result<Vec<ServerRow>, StoreError> {
            Ok(sqlx::query_as::<_, ServerRow>(select_servers!(
                "where s.state = 'running' and coalesce(s.last_activity, s.started_at) < $1 \
                 and not ($2 and u.role = 'admin')"
            ))
            .bind(idle_before)
            .bind(exempt_admins)
            .fetch_all(pool)
            .await?)
        }

        /// Running servers past their maximum age whose warning has run out.
        pub(crate) async fn expired_servers(
            pool: &Pool,
            started_before: DateTime<Utc>,
            warned_before: DateTime<Utc>,
            exempt_admins: bool,
        ) -> Result<Vec<ServerRow>, StoreError> {
            Ok(sqlx::query_as::<_, ServerRow>(select_servers!(
                "where s.state = 'running' and s.started_at < $1 and s.warned_at < $2 \
                 and not ($3 and u.role = 'admin')"
            ))
            .bind(started_before)
            .bind(warned_before)
            .bind(exempt_admins)
            .fetch_all(pool)
            .await?)
        }

        pub(crate) async fn get_job(pool: &Pool, id: Uuid) -> Result<Option<JobRow>, StoreError> {
            Ok(
                sqlx::query_as::<_, JobRow>("select * from jobs where id = $1")
                    .bind(id)
                    .fetch_optional(pool)
                    .await?,
            )
        }

        /// The filter every job listing and bulk action shares; `$1…$5` are kind,
        /// state, user, since and until, each ignored when null.
        const JOB_FILTER: &str = "($1 is null or kind = $1) and ($2 is null or state = $2) \
             and ($3 is null or user_name = $3) and ($4 is null or created_at >= $4) \
             and ($5 is null or created_at < $5)";

        fn bind_filter<'q, O>(query: QueryAs<'q, O>, f: &'q JobFilter) -> QueryAs<'q, O> {
            query
                .bind(&f.kind)
                .bind(&f.state)
                .bind(&f.user)
                .bind(f.since)
                .bind(f.until)
        }

        /// A page of the jobs matching the filter, newest first, and how many match.
        pub(crate) async fn jobs_page(
            pool: &Pool,
            filter: &JobFilter,
            offset: i64,
            limit: i64,
        ) -> Result<Page<JobRow>, StoreError> {
            let items = bind_filter(
                sqlx::query_as::<_, JobRow>(sqlx::AssertSqlSafe(format!(
                    "select * from jobs where {JOB_FILTER} \
                     order by created_at desc, id desc limit $7 offset $6"
                ))),
                filter,
            )
            .bind(offset)
            .bind(limit)
            .fetch_all(pool)
            .await?;
            let (total,): (i64,) = bind_filter(
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "select count(*) from jobs where {JOB_FILTER}"
                ))),
                filter,
            )
            .fetch_one(pool)
            .await?;
            Ok(Page { items, total })
        }

        /// The ids of the newest `limit` jobs matching the filter (bulk actions).
        pub(crate) async fn job_ids(
            pool: &Pool,
            filter: &JobFilter,
            limit: i64,
        ) -> Result<Vec<Uuid>, StoreError> {
            let rows: Vec<(Uuid,)> = bind_filter(
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "select id from jobs where {JOB_FILTER} \
                     order by created_at desc, id desc limit $6"
                ))),
                filter,
            )
            .bind(limit)
            .fetch_all(pool)
            .await?;
            Ok(rows.into_iter().map(|(id,)| id).collect())
        }

        pub(crate) async fn progress_after(
            pool: &Pool,
            job_id: Uuid,
            after: i64,
        ) -> Result<Vec<SpawnEvent>, StoreError> {
            Ok(sqlx::query_as::<_, SpawnEvent>(
                "select * from spawn_events where job_id = $1 and id > $2 order by id",
            )
            .bind(job_id)
            .bind(after)
            .fetch_all(pool)
            .await?)
        }

        pub(crate) async fn job_counts(pool: &Pool) -> Result<Vec<JobCount>, StoreError> {
            Ok(sqlx::query_as::<_, JobCount>(
                "select kind, state, count(*) as count from jobs group by kind, state \
                 order by kind, state",
            )
            .fetch_all(pool)
            .await?)
        }

        pub(crate) async fn server_counts(pool: &Pool) -> Result<Vec<StateCount>, StoreError> {
            Ok(sqlx::query_as::<_, StateCount>(
                "select state, count(*) as count from servers group by state order by state",
            )
            .fetch_all(pool)
            .await?)
        }

        pub(crate) async fn failures_since(
            pool: &Pool,
            since: DateTime<Utc>,
        ) -> Result<i64, StoreError> {
            Ok(sqlx::query_scalar(
                "select count(*) from jobs where finished_at >= $1 and state = 'failed'",
            )
            .bind(since)
            .fetch_one(pool)
            .await?)
        }

        pub(crate) async fn audit_page(
            pool: &Pool,
            offset: i64,
            limit: i64,
        ) -> Result<Page<AuditRow>, StoreError> {
            let items = sqlx::query_as::<_, AuditRow>(
                "select * from audit_log order by id desc limit $2 offset $1",
            )
            .bind(offset)
            .bind(limit)
            .fetch_all(pool)
            .await?;
            let total = sqlx::query_scalar("select count(*) from audit_log")
                .fetch_one(pool)
                .await?;
            Ok(Page { items, total })
        }

        pub(crate) async fn limit_overrides(pool: &Pool) -> Result<LimitOverrides, StoreError> {
            Ok(sqlx::query_as::<_, LimitOverrides>(
                "select concurrent_spawn_limit, active_server_limit, updated_at, updated_by \
                 from platform_limits",
            )
            .fetch_optional(pool)
            .await?
            .unwrap_or_default())
        }

        /// Whether the server holds an admission place below `limit` (one at or
        /// above it was granted before an admin lowered the limit).
        pub(crate) async fn within_active_limit(
            pool: &Pool,
            server_id: i64,
            limit: u32,
        ) -> Result<bool, StoreError> {
            let place: Option<i32> =
                sqlx::query_scalar("select slot from admission_tokens where server_id = $1")
                    .bind(server_id)
                    .fetch_optional(pool)
                    .await?;
            Ok(place.is_some_and(|p| i64::from(p) < i64::from(limit)))
        }

        pub(crate) async fn list_workers(pool: &Pool) -> Result<Vec<WorkerRow>, StoreError> {
            Ok(
                sqlx::query_as::<_, WorkerRow>("select * from workers order by started_at desc")
                    .fetch_all(pool)
                    .await?,
            )
        }
    };
}

pub(crate) mod pg {
    shared_reads!(sqlx::Postgres);
}

pub(crate) mod lite {
    shared_reads!(sqlx::Sqlite);
}
