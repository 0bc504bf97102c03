//! The spawn storm: N users ask for a server at once against an API and W worker
//! processes with limits 10/50, on servers that take 2 s to start. Reports the time
//! from the first request to the 50th running server, API latency, spawns per
//! second, memory, and the same image started with `docker run` + a readiness
//! loop at the same concurrency as the baseline.
//!
//!     cargo build --release && cargo run --release -p bench --bin storm
//!
//! Needs Postgres (BERTH_BENCH_DATABASE_URL, a superuser URL), Docker and the
//! test image (`ops/images/test-server/build.sh`).

use std::{
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use sqlx::PgPool;
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpStream, sync::Semaphore};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 200)]
    users: usize,
    #[arg(long, default_value_t = 3)]
    workers: usize,
    #[arg(long, default_value_t = 10)]
    spawn_limit: usize,
    #[arg(long, default_value_t = 50)]
    active_limit: usize,
    /// Seconds each server takes before it answers.
    #[arg(long, default_value_t = 2)]
    start_delay: u64,
    #[arg(long, default_value = "berth-test-server:latest")]
    image: String,
    #[arg(long, default_value = "target/release/berth")]
    berth: String,
    #[arg(
        long,
        env = "BERTH_BENCH_DATABASE_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Skip the `docker run` baseline.
    #[arg(long)]
    no_baseline: bool,
}

// Shared with the other benchmarks; not every helper is used here.
#[allow(dead_code)]
mod measure;
use measure::{
    Burst, Processes, cpu_ms, create_users, machine_cpu_ms, percentile, pids_named, pss_kib,
    rss_kib, spawn_burst,
};

const TOKEN: &str = "bench-admin-token-0123456789";

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker").args(args).output()?;
    if !out.status.success() {
        bail!("docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn remove_labelled(label: &str) {
    if let Ok(ids) = docker(&["ps", "-aq", "--filter", &format!("label={label}")]) {
        let ids: Vec<&str> = ids.lines().filter(|l| !l.is_empty()).collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            let _ = docker(&args);
        }
    }
}

async fn probe(ip: &str, port: u16) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect((ip, port)).await.ok()?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await.ok()?;
        Some(&head == b"HTTP/")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(true))
    )
}

/// `docker run` + a readiness loop, `count` servers at `concurrency` at a time,
/// each with what a Berth container has: its volume, memory (and swap) and CPU
/// limits, pids limit, no capabilities and no new privileges (Berth's defaults).
/// The time to the last one ready, and the average time of `docker run` itself.
async fn baseline(
    args: &Args,
    count: usize,
    concurrency: usize,
    tag: &str,
    network: &str,
) -> anyhow::Result<(Duration, Duration)> {
    let gate = Arc::new(Semaphore::new(concurrency));
    let machine = machine_cpu_ms();
    let started = Instant::now();
    let runs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = vec![];
    for i in 0..count {
        let gate = gate.clone();
        let image = args.image.clone();
        let delay = args.start_delay.to_string();
        let label = format!("berth.bench={tag}");
        let network = network.to_owned();
        let tag = tag.to_owned();
        let runs = runs.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            let name = format!("bench-{tag}-{i}");
            let env = format!("BERTH_TEST_START_DELAY={delay}");
            let volume = format!("type=volume,source={name},target=/home/jovyan/work");
            let run = Instant::now();
            let id = tokio::process::Command::new("docker")
                .args([
                    "run",
                    "-d",
                    "--name",
                    &name,
                    "--label",
                    &label,
                    "--network",
                    &network,
                    "-e",
                    &env,
                    "--mount",
                    &volume,
                    "--memory",
                    "2g",
                    "--memory-swap",
                    "2g",
                    "--cpus",
                    "1",
                    "--pids-limit",
                    "1024",
                    "--security-opt",
                    "no-new-privileges:true",
                    "--cap-drop",
                    "ALL",
                    &image,
                ])
                .output()
                .await
                .unwrap();
            runs.lock().unwrap().push(run.elapsed());
            let id = String::from_utf8_lossy(&id.stdout).trim().to_owned();
            let fmt = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
            let ip = tokio::process::Command::new("docker")
                .args(["inspect", "-f", &fmt, &id])
                .output()
                .await
                .unwrap();
            let ip = String::from_utf8_lossy(&ip.stdout).trim().to_owned();
            while !probe(&ip, 8888).await {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed();
    let now = machine_cpu_ms();
    println!(
        "baseline: the machine {:.0} % busy",
        (now.0 - machine.0) as f64 * 100.0 / (now.1 - machine.1).max(1) as f64
    );
    let runs = runs.lock().unwrap();
    let mean = runs.iter().sum::<Duration>() / runs.len().max(1) as u32;
    Ok((elapsed, mean))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tag = format!("b{:06x}", rand::random::<u32>() & 0xff_ffff);
    let admin = PgPool::connect(&args.database_url)
        .await
        .context("bench Postgres")?;
    let db = format!("berth_bench_{tag}");
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {db}")))
        .execute(&admin)
        .await?;
    let base = args
        .database_url
        .rsplit_once('/')
        .map(|(b, _)| b)
        .unwrap_or(&args.database_url);
    let url = format!("{base}/{db}");
    let network = format!("berth-{tag}");
    let result = run(&args, &tag, &url, &network).await;
    remove_labelled(&format!("berth.instance={tag}"));
    remove_labelled(&format!("berth.bench={tag}"));
    if let Ok(volumes) = docker(&[
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("name=bench-{tag}"),
    ]) {
        for v in volumes.lines().filter(|l| !l.is_empty()) {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
    }
    if let Ok(volumes) = docker(&[
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("label=berth.instance={tag}"),
    ]) {
        for v in volumes.lines().filter(|l| !l.is_empty()) {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
    }
    let _ = docker(&["network", "rm", &network]);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "drop database if exists {db} with (force)"
    )))
    .execute(&admin)
    .await?;
    result
}

async fn run(args: &Args, tag: &str, url: &str, network: &str) -> anyhow::Result<()> {
    let envs = |cmd: &mut Command| {
        cmd.env("BERTH_DATABASE_URL", url)
            .env("BERTH_CONCURRENT_SPAWN_LIMIT", args.spawn_limit.to_string())
            .env("BERTH_ACTIVE_SERVER_LIMIT", args.active_limit.to_string())
            .env(
                "BERTH_LOG",
                std::env::var("BERTH_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null());
    };
    let mut migrate = Command::new(&args.berth);
    migrate.arg("migrate");
    envs(&mut migrate);
    anyhow::ensure!(migrate.status()?.success(), "berth migrate failed");

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut processes = Processes(vec![]);
    let mut api = Command::new(&args.berth);
    api.arg("api")
        .env("BERTH_LISTEN", format!("127.0.0.1:{port}"))
        .env("BERTH_ADMIN_TOKEN", TOKEN)
        .env("BERTH_MAX_SERVERS_PER_USER", "0");
    envs(&mut api);
    processes.0.push(api.spawn()?);
    for i in 0..args.workers {
        let mut worker = Command::new(&args.berth);
        worker
            .arg("worker")
            .env("BERTH_WORKER_NAME", format!("{tag}-w{i}"))
            .env("BERTH_IMAGE", &args.image)
            .env("BERTH_NETWORK", network)
            .env("BERTH_INSTANCE", tag)
            .env("BERTH_VOLUME_PATH", "/data")
            .env("BERTH_MEM_LIMIT", "256M")
            .env("BERTH_STOP_TIMEOUT", "2")
            .env(
                "BERTH_SERVER_ENV",
                format!("BERTH_TEST_START_DELAY={}", args.start_delay),
            );
        envs(&mut worker);
        processes.0.push(worker.spawn()?);
    }
    // The scheduler, as a deployment runs it (idle culling, expiry, archiving).
    let mut scheduler = Command::new(&args.berth);
    scheduler.arg("scheduler");
    envs(&mut scheduler);
    processes.0.push(scheduler.spawn()?);
    let api_base = format!("http://127.0.0.1:{port}/api/v1");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.users)
        .build()?;
    let ready = Instant::now();
    while client
        .get(format!("http://127.0.0.1:{port}/ready"))
        .send()
        .await
        .is_err()
    {
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(30),
            "api did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let users: Vec<String> = (0..args.users).map(|i| format!("u{i}-{tag}")).collect();
    create_users(&client, &api_base, TOKEN, &users).await?;
    // Let the workers settle (reconcile, listeners) before measuring idle memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pids: Vec<u32> = processes.0.iter().map(Child::id).collect();
    let idle_rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let idle_pss: u64 = pids.iter().map(|p| pss_kib(*p)).sum();

    let pool = PgPool::connect(url).await?;
    let engine: Vec<u32> = ["dockerd", "containerd"]
        .iter()
        .flat_map(|n| pids_named(n))
        .collect();
    let cpu_of = |pids: &[u32]| pids.iter().map(|p| cpu_ms(*p)).sum::<u64>();
    let cpu_before = (cpu_of(&pids), cpu_of(&engine), machine_cpu_ms());
    let each_before: Vec<u64> = pids.iter().map(|p| cpu_ms(*p)).collect();
    let first_request = Instant::now();
    let Burst {
        answered_in: answered_all,
        latencies,
        accepted,
        refused,
        ..
    } = spawn_burst(&client, &api_base, TOKEN, &users).await;

    if args.workers == 0 {
        println!(
            "API only: {accepted} accepted, {refused} refused in {:.0} ms; latency p50 {:.1} ms, p99 {:.1} ms",
            answered_all.as_secs_f64() * 1000.0,
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99)
        );
        return Ok(());
    }
    let target = accepted as i64;
    let mut last_running = 0;
    let full = loop {
        let running: i64 =
            sqlx::query_scalar("select count(*) from servers where state = 'running'")
                .fetch_one(&pool)
                .await?;
        if running != last_running {
            last_running = running;
        }
        if running >= target {
            break first_request.elapsed();
        }
        anyhow::ensure!(
            first_request.elapsed() < Duration::from_secs(300),
            "stuck at {running} running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let peak: i64 = sqlx::query_scalar(
        "with e as (select started_at at, 1 d from spawn_attempts union all \
         select ended_at, -1 from spawn_attempts where ended_at is not null) \
         select coalesce(max(s), 0)::int8 from (select sum(d) over (order by at, d) s from e) x",
    )
    .fetch_one(&pool)
    .await?;
    let (hold, gap): (f64, f64) = sqlx::query_as(
        "select avg(extract(epoch from ended_at - started_at))::float8, \
                coalesce(avg(extract(epoch from started_at - prev))::float8, 0) \
         from (select started_at, ended_at, lag(ended_at) over (partition by slot order by started_at) prev \
               from spawn_attempts) a",
    )
    .fetch_one(&pool)
    .await?;
    // Where a spawn's time in its slot goes, from its progress events: the slot
    // taken, the volume and container created, the container started, the
    // server answering, the outcome recorded.
    let phases: Vec<Option<f64>> = {
        #[allow(clippy::type_complexity)]
        let row: (
            Option<f64>,
            Option<f64>,
            Option<f64>,
            Option<f64>,
            Option<f64>,
            Option<f64>,
            Option<f64>,
        ) = sqlx::query_as(
            "with p as (select a.job_id, min(a.started_at) slot, max(a.ended_at) freed, \
                   min(e.created_at) filter (where e.progress = 20) p20, \
                   min(e.created_at) filter (where e.progress = 40) p40, \
                   min(e.created_at) filter (where e.progress = 60) p60, \
                   min(e.created_at) filter (where e.progress = 70) p70, \
                   min(e.created_at) filter (where e.ready) ready \
                 from spawn_attempts a join spawn_events e using (job_id) group by a.job_id) \
                 select extract(epoch from (select min(started_at) from spawn_attempts) \
                          - (select min(created_at) from jobs))::float8, \
                        avg(extract(epoch from p20 - slot))::float8, \
                        avg(extract(epoch from p40 - p20))::float8, \
                        avg(extract(epoch from p60 - p40))::float8, \
                        avg(extract(epoch from p70 - p60))::float8, \
                        avg(extract(epoch from ready - p70))::float8, \
                        avg(extract(epoch from freed - ready))::float8 \
                 from p where ready is not null",
        )
        .fetch_one(&pool)
        .await?;
        vec![row.0, row.1, row.2, row.3, row.4, row.5, row.6]
    };
    // How full the slots were kept, from the first taken to the last freed.
    let in_flight: Option<f64> = sqlx::query_scalar(
        "select (sum(extract(epoch from ended_at - started_at)) \
                / nullif(extract(epoch from max(ended_at) - min(started_at)), 0))::float8 \
         from spawn_attempts",
    )
    .fetch_one(&pool)
    .await?;
    let cpu_after = (cpu_of(&pids), cpu_of(&engine), machine_cpu_ms());
    let each: Vec<u64> = pids
        .iter()
        .zip(&each_before)
        .map(|(p, before)| cpu_ms(*p) - before)
        .collect();
    let after_rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let after_pss: u64 = pids.iter().map(|p| pss_kib(*p)).sum();
    // The clients leave: their connections close (and each process has given
    // back what it freed: it trims its allocator every 10 s).
    drop(client);
    tokio::time::sleep(Duration::from_secs(11)).await;
    let left_rss: u64 = pids.iter().map(|p| rss_kib(*p)).sum();
    let left_pss: u64 = pids.iter().map(|p| pss_kib(*p)).sum();
    let waves = (target as f64 / args.spawn_limit as f64).ceil();
    let physical = waves * args.start_delay as f64;

    println!(
        "## Spawn storm: {} users, {} workers, limits {}/{}, servers start in {} s",
        args.users, args.workers, args.spawn_limit, args.active_limit, args.start_delay
    );
    println!(
        "answers: {accepted} accepted (202), {refused} refused (429), all within {:.0} ms",
        answered_all.as_secs_f64() * 1000.0
    );
    println!(
        "API latency during the storm: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    println!(
        "{target}th server running after {:.2} s; physical limit {waves} waves x {} s = {physical:.1} s; ratio {:.3}",
        full.as_secs_f64(),
        args.start_delay,
        full.as_secs_f64() / physical
    );
    println!(
        "spawns per second: {:.2}",
        target as f64 / full.as_secs_f64()
    );
    println!(
        "peak spawns in flight (from the slot record): {peak}; on average {:.1} from the first slot taken to the last freed",
        in_flight.unwrap_or_default()
    );
    println!(
        "a spawn holds its slot {:.0} ms on average; a freed slot is taken again after {:.0} ms",
        hold * 1000.0,
        gap * 1000.0
    );
    let ms = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{:.0}", v * 1000.0));
    println!(
        "the first job's first slot {} ms after the first job was written; in the slot, on \
         average (ms, from the progress events' times): limit check {} · network + volume {} · \
         create {} · start + inspect {} · until the server answers {} · outcome recorded {}",
        ms(phases[0]),
        ms(phases[1]),
        ms(phases[2]),
        ms(phases[3]),
        ms(phases[4]),
        ms(phases[5]),
        ms(phases[6]),
    );
    let (busy, all) = (
        cpu_after.2.0 - cpu_before.2.0,
        (cpu_after.2.1 - cpu_before.2.1).max(1),
    );
    // pids: the api, the workers, the scheduler.
    let workers = 1..=args.workers;
    let scheduler = args.workers + 1;
    println!(
        "CPU until the 50th ran: Berth's processes {:.1} s (api {} ms, workers {:?} ms, scheduler {} ms), dockerd + containerd {:.1} s; the machine {:.0} % busy",
        (cpu_after.0 - cpu_before.0) as f64 / 1000.0,
        each[0],
        &each[workers.clone()],
        each[scheduler],
        (cpu_after.1 - cpu_before.1) as f64 / 1000.0,
        busy as f64 * 100.0 / all as f64,
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "RSS idle: api {} KiB, workers {:?} KiB, scheduler {} KiB; after the storm: api {} KiB, workers {:?} KiB, scheduler {} KiB",
        idle_rss[0],
        &idle_rss[workers.clone()],
        idle_rss[scheduler],
        after_rss[0],
        &after_rss[workers],
        after_rss[scheduler],
    );
    println!(
        "memory together (the sum of RSS / of PSS, which counts the pages they share, the binary's among them, once): api + {} workers + scheduler idle {:.1} / {:.1} MiB; after the storm {:.1} / {:.1} MiB with the {} clients' connections open, {:.1} / {:.1} MiB 11 s after they closed (target: api + worker + scheduler < 45 MiB)",
        args.workers,
        mib(idle_rss.iter().sum()),
        mib(idle_pss),
        mib(after_rss.iter().sum()),
        mib(after_pss),
        args.users,
        mib(left_rss),
        mib(left_pss),
    );
    drop(processes);
    remove_labelled(&format!("berth.instance={tag}"));

    if !args.no_baseline {
        let (elapsed, run) =
            baseline(args, target as usize, args.spawn_limit, tag, network).await?;
        println!(
            "baseline docker run (Berth's container options) + readiness loop, {target} servers at concurrency {}: {:.2} s ({:.2} spawns/s; docker run itself {:.0} ms on average); Berth overhead {:+.1} %",
            args.spawn_limit,
            elapsed.as_secs_f64(),
            target as f64 / elapsed.as_secs_f64(),
            run.as_secs_f64() * 1000.0,
            (full.as_secs_f64() / elapsed.as_secs_f64() - 1.0) * 100.0
        );
    }
    Ok(())
}
