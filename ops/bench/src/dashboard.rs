//! Dashboard page times with a large history: seeds N jobs (default 100 000), a
//! few thousand users and servers and audit rows, serves the real API on a free
//! port, logs in through the login form and times each page R times.
//!
//!     cargo run --release -p bench --bin dashboard -- --jobs 100000 --rounds 20
//!
//! Needs Postgres (BERTH_BENCH_DATABASE_URL, a superuser URL); with `--store sqlite`,
//! the same on the embedded store in a temporary directory instead.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use schema::{PgStore, QueueSettings};
use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    jobs: i64,
    #[arg(long, default_value_t = 2_000)]
    users: i64,
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// `postgres`, or `sqlite` for the embedded store (`berth up` without a database).
    #[arg(long, default_value = "postgres")]
    store: String,
    #[arg(
        long,
        env = "BERTH_BENCH_DATABASE_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
}

#[derive(Parser)]
struct ApiFlags {
    #[command(flatten)]
    config: api::ApiConfig,
}

const ADMIN: &str = "benchadmin";
const PASSWORD: &str = "a bench password that is long";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.store == "sqlite" {
        let dir = std::env::temp_dir().join(format!("berth-bench-d-{:08x}", rand::random::<u32>()));
        let result = measure_sqlite(&args, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        return result;
    }
    let db = format!("berth_bench_d_{:08x}", rand::random::<u32>());
    let admin = PgPool::connect(&args.database_url)
        .await
        .context("bench Postgres")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {db}")))
        .execute(&admin)
        .await?;
    let url = match args.database_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => anyhow::bail!("database URL without a database"),
    };
    let result = measure(&args, &url).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "drop database if exists {db} with (force)"
    )))
    .execute(&admin)
    .await?;
    result
}

async fn seed(pool: &PgPool, args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    sqlx::query(
        "insert into users (name) select 'u' || g from generate_series(1, $1) g on conflict do nothing",
    )
    .bind(args.users)
    .execute(pool)
    .await?;
    sqlx::query(
        "insert into servers (user_id, name, state, started_at, last_activity, container_id) \
         select id, '', (array['running','stopped','failed'])[1 + id % 3], now() - interval '2 hours', \
         now() - (id % 120) * interval '1 minute', md5(id::text) from users",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "insert into jobs (id, kind, state, user_name, server_name, attempts, last_error, worker, \
           created_at, started_at, finished_at) \
         select gen_random_uuid(), \
           (array['spawn','stop','cleanup','cull','expire_sessions','archive'])[1 + (g % 20 = 0)::int * 3 + (g % 2)], \
           (array['succeeded','succeeded','succeeded','failed','cancelled','queued'])[1 + g % 6], \
           'u' || (1 + g % $2), '', 1 + g % 3, \
           case when g % 6 = 3 then 'image berth-missing: could not be pulled' end, 'bench-worker', \
           t, t + interval '1 second', case when g % 6 <> 5 then t + interval '3 seconds' end \
         from (select g, now() - (g * interval '25 seconds') as t from generate_series(1, $1) g) s",
    )
    .bind(args.jobs)
    .bind(args.users)
    .execute(pool)
    .await?;
    sqlx::query(
        "insert into audit_log (actor, action, target, client_addr, detail) \
         select 'user:u' || g % 50, 'login_succeeded', 'u' || g % 50, '127.0.0.1', '{}' \
         from generate_series(1, 20000) g",
    )
    .execute(pool)
    .await?;
    sqlx::query("analyze").execute(pool).await?;
    println!(
        "seeded {} jobs, {} users and servers, 20000 audit rows in {:.1} s",
        args.jobs,
        args.users,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn measure(args: &Args, url: &str) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(24)
        .connect(url)
        .await?;
    schema::migrate(&pool).await?;
    seed(&pool, args).await?;
    let (some_job,): (uuid::Uuid,) =
        sqlx::query_as("select id from jobs where state = 'failed' limit 1")
            .fetch_one(&pool)
            .await?;
    let shutdown = CancellationToken::new();
    let (queue, _) = QueueSettings::Postgres
        .open(&pool, shutdown.clone())
        .await?;
    let store = Arc::new(schema::Db::from(PgStore::new(pool.clone(), queue)));
    time_pages(args, store, some_job, shutdown).await?;
    pool.close().await;
    Ok(())
}

/// The same seed on the embedded store.
async fn measure_sqlite(args: &Args, dir: &std::path::Path) -> anyhow::Result<()> {
    let store = schema::SqliteStore::open(dir).await?;
    let pool = store.pool();
    let started = Instant::now();
    // Times as Berth writes them: RFC 3339 text in UTC.
    let at = |offset: &str| format!("strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now', {offset})");
    sqlx::query(
        "with recursive n(g) as (select 1 union all select g + 1 from n where g < $1) \
         insert into users (name, created_at) select 'u' || g, $2 from n",
    )
    .bind(args.users)
    .bind(chrono::Utc::now())
    .execute(pool)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "insert into servers (user_id, name, state, started_at, last_activity, container_id, \
           requested_at, created_at, updated_at) \
         select id, '', case id % 3 when 0 then 'running' when 1 then 'stopped' else 'failed' end, \
           {two_hours}, {idle}, hex(randomblob(8)), {two_hours}, {two_hours}, {two_hours} from users",
        two_hours = at("'-2 hours'"),
        idle = at("'-' || (id % 120) || ' minutes'"),
    )))
    .execute(pool)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "with recursive n(g) as (select 1 union all select g + 1 from n where g < $1) \
         insert into jobs (id, kind, state, user_name, server_name, attempts, last_error, worker, \
           created_at, started_at, finished_at) \
         select randomblob(16), \
           case (g % 20 = 0) * 3 + g % 2 when 0 then 'spawn' when 1 then 'stop' when 3 then 'cull' \
             else 'expire_sessions' end, \
           case g % 6 when 3 then 'failed' when 4 then 'cancelled' when 5 then 'queued' \
             else 'succeeded' end, \
           'u' || (1 + g % $2), '', 1 + g % 3, \
           case when g % 6 = 3 then 'image berth-missing: could not be pulled' end, 'bench-worker', \
           {created}, {started}, case when g % 6 <> 5 then {finished} end from n",
        created = at("'-' || (g * 25) || ' seconds'"),
        started = at("'-' || (g * 25 - 1) || ' seconds'"),
        finished = at("'-' || (g * 25 - 3) || ' seconds'"),
    )))
    .bind(args.jobs)
    .bind(args.users)
    .execute(pool)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "with recursive n(g) as (select 1 union all select g + 1 from n where g < 20000) \
         insert into audit_log (actor, action, target, client_addr, detail, at) \
         select 'user:u' || g % 50, 'login_succeeded', 'u' || g % 50, '127.0.0.1', '{{}}', {now} from n",
        now = at("'-0 seconds'"),
    )))
    .execute(pool)
    .await?;
    sqlx::query("analyze").execute(pool).await?;
    println!(
        "seeded {} jobs, {} users and servers, 20000 audit rows on SQLite in {:.1} s",
        args.jobs,
        args.users,
        started.elapsed().as_secs_f64()
    );
    let (some_job,): (uuid::Uuid,) =
        sqlx::query_as("select id from jobs where state = 'failed' limit 1")
            .fetch_one(pool)
            .await?;
    let store = Arc::new(schema::Db::from(store));
    time_pages(args, store, some_job, CancellationToken::new()).await
}

/// Serves the API on `store`, logs in through the form and times each page.
async fn time_pages(
    args: &Args,
    store: Arc<schema::Db>,
    some_job: uuid::Uuid,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let config =
        ApiFlags::try_parse_from(["api", "--admin-user", ADMIN, "--admin-password", PASSWORD])?
            .config;
    let server = tokio::spawn(api::run(
        config,
        store,
        listener,
        shutdown.clone(),
        api::Serve::Api,
    ));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let mut cookie = None;
    for _ in 0..100 {
        if let Ok(r) = http
            .post(format!("{base}/admin/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "username={ADMIN}&password={}",
                PASSWORD.replace(' ', "+")
            ))
            .send()
            .await
        {
            cookie = r
                .headers()
                .get("set-cookie")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .map(str::to_owned);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cookie = cookie.context("logging in")?;
    let day_ago = (chrono::Utc::now() - chrono::Duration::hours(24)).format("%Y-%m-%dT%H:%M");
    let pages = [
        "/admin".to_owned(),
        "/admin/jobs".into(),
        "/admin/jobs?state=failed".into(),
        "/admin/jobs?kind=spawn&state=succeeded&page=100".into(),
        "/admin/jobs?user=u42".into(),
        format!("/admin/jobs?since={day_ago}"),
        format!("/admin/jobs/{some_job}"),
        "/admin/servers".into(),
        "/admin/servers?state=running&user=u1".into(),
        "/admin/users?q=u19".into(),
        "/admin/audit?page=10".into(),
        "/admin/workers".into(),
        "/admin/schedules".into(),
    ];
    println!(
        "{:<52} {:>8} {:>8} {:>8}",
        "page", "p50 ms", "p95 ms", "max ms"
    );
    for page in &pages {
        let mut times = vec![];
        for _ in 0..args.rounds {
            let started = Instant::now();
            let response = http
                .get(format!("{base}{page}"))
                .header("cookie", &cookie)
                .send()
                .await?;
            let status = response.status();
            response.bytes().await?;
            times.push(started.elapsed());
            anyhow::ensure!(status.is_success(), "{page} answered {status}");
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<52} {:>8.1} {:>8.1} {:>8.1}",
            page,
            ms(times[times.len() / 2]),
            ms(times[(times.len() * 95 / 100).min(times.len() - 1)]),
            ms(*times.last().unwrap())
        );
    }
    shutdown.cancel();
    let _ = server.await;
    Ok(())
}
