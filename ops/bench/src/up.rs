//! A spawn storm against one `berth up` (API, worker and scheduler in one process),
//! on the embedded store or on Postgres (`--store postgres`): N users ask for a
//! server at once, and every admitted user then polls their server until it runs,
//! as a spawn page does. Servers are local processes that answer `--start-delay`
//! seconds after they start (or the test image on Docker with `--spawner docker`).
//! Reports every answer's latency (202 and 429 alike) during the burst and of the
//! polls after it, the time to the 50th and to the last server running beside the
//! physical limit (waves of `spawn_limit` × start delay), spawns per second, the
//! peak of spawns in flight from the slot record, memory, and the embedded store's
//! file sizes.
//!
//!     cargo build --release -p berth -p bench
//!     ./target/release/up            # --users 200 --spawn-limit 10 --active-limit 50 --store sqlite|postgres

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use tokio::sync::Mutex;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 200)]
    users: usize,
    #[arg(long, default_value_t = 10)]
    spawn_limit: usize,
    #[arg(long, default_value_t = 50)]
    active_limit: usize,
    /// `sqlite` (the embedded store) or `postgres` (a fresh database on
    /// `--database-url`).
    #[arg(long, default_value = "sqlite")]
    store: String,
    #[arg(
        long,
        env = "BERTH_BENCH_DATABASE_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// `process` (busybox httpd as the server) or `docker` (the test image).
    #[arg(long, default_value = "process")]
    spawner: String,
    /// Seconds a local-process server takes before it answers.
    #[arg(long, default_value_t = 2)]
    start_delay: u64,
    /// How often an admitted user polls their server until it runs, ms.
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
    #[arg(long, default_value = "berth-test-server:latest")]
    image: String,
    #[arg(long, default_value = "target/release/berth")]
    berth: String,
    /// Keep `berth up`'s log in this file, at `--log-filter` (by default it is
    /// discarded).
    #[arg(long)]
    log: Option<PathBuf>,
    #[arg(long, default_value = "warn")]
    log_filter: String,
}

// Shared with the other benchmarks; not every helper is used here.
#[allow(dead_code)]
mod measure;
use measure::{BenchDatabase, Burst, cpu_ms, create_users, percentile, rss_kib, spawn_burst};

const TOKEN: &str = "bench-admin-token-0123456789";

struct Run {
    child: Option<Child>,
    data: PathBuf,
    instance: String,
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Servers outlive `berth up` by design: end the ones this run started.
        let run = self.data.join(&self.instance).join("run");
        for dir in std::fs::read_dir(run).into_iter().flatten().flatten() {
            if let Some(pid) = std::fs::read_to_string(dir.path().join("pid"))
                .ok()
                .and_then(|p| p.split_whitespace().next().map(str::to_owned))
            {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status();
            }
        }
        if let Ok(ids) = Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label=berth.instance={}", self.instance))
            .output()
        {
            let ids = String::from_utf8_lossy(&ids.stdout).to_string();
            let ids: Vec<&str> = ids.lines().filter(|l| !l.is_empty()).collect();
            if !ids.is_empty() {
                let _ = Command::new("docker").args(["rm", "-f"]).args(ids).output();
            }
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &format!("berth-{}", self.instance)])
            .output();
        let _ = std::fs::remove_dir_all(&self.data);
        let _ = std::fs::remove_dir_all(self.data.with_extension("homes"));
    }
}

fn size_kib(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len() / 1024).unwrap_or(0)
}

/// The run's database, read by the benchmark beside `berth up`.
enum Reader {
    Lite(sqlx::SqlitePool),
    Pg(sqlx::PgPool),
}

impl Reader {
    async fn count(&self, sql: &'static str) -> anyhow::Result<i64> {
        Ok(match self {
            Reader::Lite(p) => sqlx::query_scalar(sql).fetch_one(p).await?,
            Reader::Pg(p) => sqlx::query_scalar(sql).fetch_one(p).await?,
        })
    }
}

/// Polls of users' servers after the burst: each answer's time, ms.
type Polls = Arc<Mutex<Vec<f64>>>;

/// One admitted user polling their server every `every` until it runs.
async fn poll_until_running(
    client: reqwest::Client,
    url: String,
    every: Duration,
    polls: Polls,
) -> anyhow::Result<()> {
    loop {
        tokio::time::sleep(every).await;
        let sent = Instant::now();
        let answer = client.get(&url).bearer_auth(TOKEN).send().await?;
        let status = answer.status();
        let body: serde_json::Value = answer.json().await?;
        polls
            .lock()
            .await
            .push(sent.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(status.is_success(), "{url}: {status} {body}");
        match body["state"].as_str() {
            Some("running") => return Ok(()),
            Some("pending_spawn") => {}
            other => anyhow::bail!("{url}: the server went {other:?}: {body}"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        matches!(args.store.as_str(), "sqlite" | "postgres"),
        "--store is sqlite or postgres"
    );
    let instance = format!("b{:06x}", rand::random::<u32>() & 0xff_ffff);
    let data = std::env::temp_dir().join(format!("berth-bench-{instance}"));
    let port = measure::free_port();
    let database = if args.store == "postgres" {
        Some(BenchDatabase::create(&args.database_url, "berth_bench_up").await?)
    } else {
        None
    };
    let outcome = run(
        &args,
        &instance,
        &data,
        port,
        database.as_ref().map(|d| d.url.as_str()),
    )
    .await;
    if let Some(database) = database {
        database.remove().await;
    }
    outcome
}

async fn run(
    args: &Args,
    instance: &str,
    data: &std::path::Path,
    port: u16,
    database_url: Option<&str>,
) -> anyhow::Result<()> {
    let mut run = Run {
        child: None,
        data: data.to_owned(),
        instance: instance.to_owned(),
    };
    let started = Instant::now();
    let mut up = Command::new(&args.berth);
    up.arg("up")
        .env_remove("BERTH_DATABASE_URL")
        .env("BERTH_DATA_DIR", data)
        .env("BERTH_HOMES_DIR", data.with_extension("homes"))
        .env("BERTH_LISTEN", format!("127.0.0.1:{port}"))
        .env("BERTH_INSTANCE", instance)
        .env("BERTH_ADMIN_TOKEN", TOKEN)
        .env("BERTH_MAX_SERVERS_PER_USER", "0")
        .env("BERTH_CONCURRENT_SPAWN_LIMIT", args.spawn_limit.to_string())
        .env("BERTH_ACTIVE_SERVER_LIMIT", args.active_limit.to_string())
        .env("BERTH_SPAWNER", &args.spawner)
        .env(
            "BERTH_SERVER_COMMAND",
            format!(
                "sleep {}; exec busybox httpd -f -p 127.0.0.1:{{port}}",
                args.start_delay
            ),
        )
        .env("BERTH_IMAGE", &args.image)
        .env("BERTH_NETWORK", format!("berth-{instance}"))
        .env("BERTH_LOG", &args.log_filter)
        .stdout(Stdio::null())
        .stderr(match &args.log {
            Some(path) => Stdio::from(std::fs::File::create(path).context("the log file")?),
            None => Stdio::null(),
        });
    if let Some(url) = database_url {
        up.env("BERTH_DATABASE_URL", url);
    }
    let child = up.spawn().context("starting berth up")?;
    let pid = child.id();
    run.child = Some(child);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.users)
        .build()?;
    while client.get(format!("{base}/ready")).send().await.is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "berth up did not come up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let up_in = started.elapsed();
    let users: Vec<String> = (0..args.users)
        .map(|i| format!("u{i}-{instance}"))
        .collect();
    let api = format!("{base}/api/v1");
    create_users(&client, &api, TOKEN, &users).await?;
    let db = match database_url {
        Some(url) => Reader::Pg(sqlx::PgPool::connect(url).await?),
        None => Reader::Lite(
            sqlx::SqlitePool::connect_with(
                sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(data.join("berth.db"))
                    .read_only(true),
            )
            .await?,
        ),
    };
    // Idle: nothing asked for 12 s (`berth up` trims its allocator every 10 s).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let idle_rss = rss_kib(pid);
    // The floor: as many requests at once, each on a new connection, as the burst
    // will send, to `health` (no database).
    let floor = {
        let fresh = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()?;
        let first = Instant::now();
        let answers = futures::future::join_all(users.iter().map(|_| {
            let (fresh, url) = (fresh.clone(), format!("{api}/health"));
            async move {
                let sent = Instant::now();
                let answer = fresh.get(url).bearer_auth(TOKEN).send().await;
                (
                    answer.map(|a| a.status()),
                    sent.elapsed().as_secs_f64() * 1000.0,
                )
            }
        }))
        .await;
        let all = first.elapsed();
        let mut latencies: Vec<f64> = answers.iter().map(|(_, ms)| *ms).collect();
        latencies.sort_by(f64::total_cmp);
        anyhow::ensure!(
            answers
                .iter()
                .all(|(s, _)| matches!(s, Ok(s) if s.as_u16() == 404)),
            "a read of a server no one asked for answers 404"
        );
        (all, latencies)
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (berth_cpu, own_cpu) = (cpu_ms(pid), cpu_ms(std::process::id()));
    let first = Instant::now();
    let Burst {
        answered_in: answered,
        latencies,
        accepted,
        refused,
        admitted,
    } = spawn_burst(&client, &api, TOKEN, &users).await;
    let burst_cpu = (
        cpu_ms(pid) - berth_cpu,
        cpu_ms(std::process::id()) - own_cpu,
    );
    let polls = Polls::default();
    let pollers: Vec<_> = admitted
        .iter()
        .map(|u| {
            tokio::spawn(poll_until_running(
                client.clone(),
                format!("{api}/users/{u}/server"),
                Duration::from_millis(args.poll_ms),
                polls.clone(),
            ))
        })
        .collect();

    let fiftieth = 50.min(accepted) as i64;
    let mut at_fiftieth = None;
    let all_running = loop {
        let running = db
            .count("select count(*) from servers where state = 'running'")
            .await?;
        if at_fiftieth.is_none() && running >= fiftieth {
            at_fiftieth = Some(first.elapsed());
        }
        if running >= accepted as i64 {
            break first.elapsed();
        }
        anyhow::ensure!(
            first.elapsed() < Duration::from_secs(300),
            "stuck at {running} running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for poller in pollers {
        poller.await??;
    }
    let peak = db
        .count(
            "with e as (select started_at at, 1 d from spawn_attempts union all \
             select ended_at, -1 from spawn_attempts where ended_at is not null) \
             select coalesce(max(s), 0) from (select sum(d) over (order by at, d) s from e) x",
        )
        .await?;
    let failed = db
        .count("select count(*) from jobs where state = 'failed'")
        .await?;
    let after_rss = rss_kib(pid);
    // The clients leave: their connections close (and `berth up` has given back
    // what it freed: it trims its allocator every 10 s).
    drop(client);
    tokio::time::sleep(Duration::from_secs(11)).await;
    let left_rss = rss_kib(pid);
    let mut polls = std::mem::take(&mut *polls.lock().await);
    polls.sort_by(f64::total_cmp);

    let waves = (fiftieth as u64).div_ceil(args.spawn_limit as u64);
    let physical = Duration::from_secs(waves * args.start_delay);
    let at_fiftieth = at_fiftieth.unwrap_or(all_running);
    println!(
        "## a storm against berth up on {}: {} users, {} spawner, limits {}/{}, servers ready {} s after start, polled every {} ms",
        if database_url.is_some() {
            "Postgres"
        } else {
            "the embedded store"
        },
        args.users,
        args.spawner,
        args.spawn_limit,
        args.active_limit,
        args.start_delay,
        args.poll_ms
    );
    println!(
        "berth up answered /ready {:.0} ms after start (migrations included)",
        up_in.as_secs_f64() * 1000.0
    );
    println!(
        "burst: {accepted} accepted, {refused} refused of {}, all answered within {:.0} ms; every answer p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        args.users,
        answered.as_secs_f64() * 1000.0,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    println!(
        "CPU during the burst: berth up {} ms, this benchmark's clients {} ms",
        burst_cpu.0, burst_cpu.1
    );
    println!(
        "the floor, as many requests for /health at once on new connections: all answered within {:.0} ms; p50 {:.1} ms, p99 {:.1} ms",
        floor.0.as_secs_f64() * 1000.0,
        percentile(&floor.1, 0.5),
        percentile(&floor.1, 0.99),
    );
    println!(
        "polls of the admitted users' servers until running: {} answers, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        polls.len(),
        percentile(&polls, 0.5),
        percentile(&polls, 0.99),
        polls.last().copied().unwrap_or_default()
    );
    if args.spawner == "process" {
        println!(
            "server {fiftieth} running after {:.2} s; physical limit {:.0} s ({waves} waves of {} × {} s): {:.3}×",
            at_fiftieth.as_secs_f64(),
            physical.as_secs_f64(),
            args.spawn_limit,
            args.start_delay,
            at_fiftieth.as_secs_f64() / physical.as_secs_f64()
        );
    } else {
        println!(
            "server {fiftieth} running after {:.2} s",
            at_fiftieth.as_secs_f64()
        );
    }
    println!(
        "last server running after {:.2} s: {:.1} spawns/s; failed jobs {failed}; peak spawns in flight {peak} (limit {})",
        all_running.as_secs_f64(),
        accepted as f64 / all_running.as_secs_f64(),
        args.spawn_limit
    );
    println!(
        "memory (RSS) of berth up, api + worker + scheduler: idle {:.1} MiB; after the storm {:.1} MiB with the {} clients' connections open, {:.1} MiB 11 s after they closed",
        idle_rss as f64 / 1024.0,
        after_rss as f64 / 1024.0,
        args.users,
        left_rss as f64 / 1024.0,
    );
    if database_url.is_none() {
        println!(
            "berth.db {} KiB + WAL {} KiB",
            size_kib(&data.join("berth.db")),
            size_kib(&data.join("berth.db-wal"))
        );
    }
    Ok(())
}
