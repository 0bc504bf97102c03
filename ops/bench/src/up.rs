//! `berth up` on the embedded store: N users ask for a server at once against one
//! `berth up` process with no database, its servers as local processes (or on
//! Docker with `--spawner docker`). Reports API latency during the burst, the time
//! to the last server running, spawns per second, the peak of spawns in flight from
//! the slot record, the embedded store's file sizes and the process's memory.
//!
//!     cargo build --release -p berth -p bench
//!     ./target/release/up            # --users 100 --spawn-limit 10 --active-limit 200

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100)]
    users: usize,
    #[arg(long, default_value_t = 10)]
    spawn_limit: usize,
    #[arg(long, default_value_t = 200)]
    active_limit: usize,
    /// `process` (busybox httpd as the server) or `docker` (the test image).
    #[arg(long, default_value = "process")]
    spawner: String,
    #[arg(long, default_value = "berth-test-server:latest")]
    image: String,
    #[arg(long, default_value = "target/release/berth")]
    berth: String,
}

// Shared with the other benchmarks; not every helper is used here.
#[allow(dead_code)]
mod measure;
use measure::{Burst, create_users, percentile, rss_kib, spawn_burst};

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let instance = format!("b{:06x}", rand::random::<u32>() & 0xff_ffff);
    let data = std::env::temp_dir().join(format!("berth-bench-{instance}"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut run = Run {
        child: None,
        data: data.clone(),
        instance: instance.clone(),
    };
    let started = Instant::now();
    let child = Command::new(&args.berth)
        .arg("up")
        .env_remove("BERTH_DATABASE_URL")
        .env("BERTH_DATA_DIR", &data)
        .env("BERTH_HOMES_DIR", data.with_extension("homes"))
        .env("BERTH_LISTEN", format!("127.0.0.1:{port}"))
        .env("BERTH_INSTANCE", &instance)
        .env("BERTH_ADMIN_TOKEN", TOKEN)
        .env("BERTH_MAX_SERVERS_PER_USER", "0")
        .env("BERTH_CONCURRENT_SPAWN_LIMIT", args.spawn_limit.to_string())
        .env("BERTH_ACTIVE_SERVER_LIMIT", args.active_limit.to_string())
        .env("BERTH_SPAWNER", &args.spawner)
        .env(
            "BERTH_SERVER_COMMAND",
            "exec busybox httpd -f -p 127.0.0.1:{port}",
        )
        .env("BERTH_IMAGE", &args.image)
        .env("BERTH_NETWORK", format!("berth-{instance}"))
        .env("BERTH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting berth up")?;
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
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = rss_kib(pid);

    let first = Instant::now();
    let Burst {
        answered_in: answered,
        latencies,
        accepted,
        refused,
    } = spawn_burst(&client, &api, TOKEN, &users).await;

    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(data.join("berth.db"))
        .read_only(true);
    let db = sqlx::SqlitePool::connect_with(options).await?;
    let all_running = loop {
        let running: i64 =
            sqlx::query_scalar("select count(*) from servers where state = 'running'")
                .fetch_one(&db)
                .await?;
        if running >= accepted as i64 {
            break first.elapsed();
        }
        anyhow::ensure!(
            first.elapsed() < Duration::from_secs(300),
            "stuck at {running} running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let peak: i64 = sqlx::query_scalar(
        "with e as (select started_at at, 1 d from spawn_attempts union all \
         select ended_at, -1 from spawn_attempts where ended_at is not null) \
         select coalesce(max(s), 0) from (select sum(d) over (order by at, d) s from e) x",
    )
    .fetch_one(&db)
    .await?;
    let failed: i64 = sqlx::query_scalar("select count(*) from jobs where state = 'failed'")
        .fetch_one(&db)
        .await?;
    let after_rss = rss_kib(pid);
    db.close().await;

    println!(
        "## berth up on the embedded store: {} users, {} spawner, limits {}/{}",
        args.users, args.spawner, args.spawn_limit, args.active_limit
    );
    println!(
        "berth up answered /ready {:.0} ms after start (empty data directory, migrations included)",
        up_in.as_secs_f64() * 1000.0
    );
    println!(
        "answers: {accepted} accepted, {refused} refused of {}, all within {:.0} ms; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        args.users,
        answered.as_secs_f64() * 1000.0,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    println!(
        "last server running after {:.2} s: {:.1} spawns/s; failed jobs {failed}; peak spawns in flight {peak} (limit {})",
        all_running.as_secs_f64(),
        accepted as f64 / all_running.as_secs_f64(),
        args.spawn_limit
    );
    println!(
        "memory (RSS) of the one process: idle {:.1} MiB, after {:.1} MiB; berth.db {} KiB + WAL {} KiB",
        idle_rss as f64 / 1024.0,
        after_rss as f64 / 1024.0,
        size_kib(&data.join("berth.db")),
        size_kib(&data.join("berth.db-wal"))
    );
    Ok(())
}
