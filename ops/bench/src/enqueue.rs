//! Spawn requests per second on Postgres, beside pgbench running a transaction of
//! the same shape on the same database in the same sitting (issue 16, target 1).
//!
//!     cargo build --release -p berth -p bench
//!     ./target/release/enqueue     # --connections 50 --seconds 10 --users 1000
//!
//! Needs Postgres (BERTH_BENCH_DATABASE_URL, a superuser URL), `wrk` and `pgbench`
//! (Debian's packages). It makes a fresh database, runs `berth migrate`, one
//! `berth api` and one `berth worker` (local processes, one spawn at a time, so
//! workers run while the requests arrive), creates the users, then has wrk send
//! `POST /api/v1/users/{user}/servers/{name}` with a new name each time, spread over
//! the users: every answer is a 202 whose job, server row, queue entry and progress
//! event are committed before it is sent. The reference is pgbench (`-M prepared`,
//! the same connections) running BEGIN, a locking read, an upsert, a count, three
//! inserts, an update and COMMIT on tables of its own in the same database.

use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use clap::Parser;

// Shared with the other benchmarks; not every helper is used here.
#[allow(dead_code)]
mod measure;
use measure::{
    Processes, cpu_ms, free_port, machine_cpu_ms, pids_named, rss_kib, wait_answers, wrk,
};

#[derive(Parser)]
struct Args {
    /// Connections of wrk and clients of pgbench.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Seconds of each measured run (after 2 s of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Users the requests are spread over.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    #[arg(long, default_value = "target/release/berth")]
    berth: String,
    #[arg(
        long,
        env = "BERTH_BENCH_DATABASE_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
}

const TOKEN: &str = "bench-admin-token-0123456789";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut processes = Processes(vec![]);
    let db = measure::BenchDatabase::create(&args.database_url, "berth_bench_enqueue").await?;
    let result = run(&args, &db.url, &mut processes).await;
    drop(processes);
    db.remove().await;
    result
}

async fn run(args: &Args, url: &str, processes: &mut Processes) -> anyhow::Result<()> {
    let data = std::env::temp_dir().join(format!("berth-bench-enqueue-{}", std::process::id()));
    let port = free_port();
    let common = |cmd: &mut Command| {
        cmd.env("BERTH_DATABASE_URL", url)
            .env("BERTH_LOG", "warn")
            .env("BERTH_LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
    };
    let mut migrate = Command::new(&args.berth);
    migrate.arg("migrate");
    common(&mut migrate);
    if !migrate.status().context("berth migrate")?.success() {
        bail!("berth migrate failed");
    }
    let mut api = Command::new(&args.berth);
    api.arg("api")
        .env("BERTH_ADMIN_TOKEN", TOKEN)
        .env("BERTH_MAX_SERVERS_PER_USER", "0")
        .env("BERTH_ACTIVE_SERVER_LIMIT", "100000");
    common(&mut api);
    let api = api.spawn().context("berth api")?;
    let api_pid = api.id();
    processes.0.push(api);
    // A worker that takes one spawn at a time of a server that never answers: it
    // fetches, claims and waits for slots while the requests arrive.
    let mut worker = Command::new(&args.berth);
    worker
        .arg("worker")
        .env("BERTH_SPAWNER", "process")
        .env("BERTH_CONCURRENT_SPAWN_LIMIT", "1")
        .env("BERTH_ACTIVE_SERVER_LIMIT", "100000")
        .env("BERTH_SERVER_COMMAND", "sleep 600")
        .env("BERTH_DATA_DIR", &data)
        .env("BERTH_HOMES_DIR", data.with_extension("homes"));
    common(&mut worker);
    processes.0.push(worker.spawn().context("berth worker")?);

    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_answers(&http, &format!("{base}/ready")).await?;
    let users: Vec<String> = (0..args.users).map(|i| format!("u{i}")).collect();
    measure::create_users(&http, &format!("{base}/api/v1"), TOKEN, &users).await?;

    // Each wrk thread names its servers r{run}t{thread}n{i}; user i mod N. The
    // warm-up is a run of its own, so the measured run's names are all new.
    let scripts = ["warm-up", "measured"].map(|run| {
        let script = data.with_extension(format!("{run}.lua"));
        std::fs::write(&script, wrk_script(args.users, run))
            .map(|()| script.to_string_lossy().into_owned())
    });
    let [warm_up, script] = scripts;
    let (warm_up, script) = (warm_up?, script?);
    println!(
        "Enqueue: POST /api/v1/users/{{user}}/servers/{{new name}} over {} users, wrk 2 threads × {} connections, {} s after 2 s of warm-up; one api, one worker",
        args.users, args.connections, args.seconds
    );
    let rss_before = rss_kib(api_pid);
    wrk(&base, &["-s", &warm_up], args.connections, 2)?;
    let postgres = || pids_named("postgres").into_iter().map(cpu_ms).sum::<u64>();
    let (api_cpu, pg_cpu, machine) = (cpu_ms(api_pid), postgres(), machine_cpu_ms());
    let (rate, p50, p99) = wrk(&base, &["-s", &script], args.connections, args.seconds)?;
    let share = |ms: u64| ms as f64 / (args.seconds as f64 * 1e3);
    let (api_cpu, pg_cpu) = (share(cpu_ms(api_pid) - api_cpu), share(postgres() - pg_cpu));
    let (busy, all) = machine_cpu_ms();
    let machine_busy = (busy - machine.0) as f64 / (all - machine.1) as f64;
    let rss_after = rss_kib(api_pid);
    // What stays once the API has given back what it freed (every 10 s).
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    let rss_settled = rss_kib(api_pid);
    println!("  berth api    {rate:>8.0} req/s   p50 {p50:>7.2} ms   p99 {p99:>7.2} ms");
    println!(
        "  cpu          api {api_cpu:.2} cores, postgres {pg_cpu:.2} cores; the machine {:.0} % busy",
        machine_busy * 100.0
    );
    println!(
        "  api memory   {:.1} MiB before wrk, {:.1} MiB as it ended, {:.1} MiB 11 s later (target: within 10 MiB)",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        rss_settled as f64 / 1024.0
    );
    let spawns: i64 = sqlx::query_scalar("select count(*) from jobs where kind = 'spawn'")
        .fetch_one(&sqlx::PgPool::connect(url).await?)
        .await?;
    println!("  ({spawns} spawn jobs committed)");

    let (tps, latency) = pgbench(url, args, &data)?;
    println!(
        "  pgbench      {tps:>8.0} tps     mean {latency:>6.2} ms   (the same shape: 9 round trips, prepared)"
    );
    println!(
        "  ratio        {:.2}× pgbench (target ≥ 5,000 req/s with p99 < 20 ms)",
        rate / tps
    );
    let _ = std::fs::remove_file(&warm_up);
    let _ = std::fs::remove_file(&script);
    Ok(())
}

fn wrk_script(users: usize, run: &str) -> String {
    format!(
        r#"local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  tid = wrk.thread:get("tid")
  i = 0
end
function request()
  i = i + 1
  local path = "/api/v1/users/u" .. (i % {users}) .. "/servers/{run}-t" .. tid .. "n" .. i
  return wrk.format("POST", path, {{["Authorization"] = "Bearer {TOKEN}"}}, nil)
end
"#
    )
}

/// pgbench with a transaction of a spawn request's shape on tables of its own:
/// transactions per second and the mean latency in ms.
fn pgbench(url: &str, args: &Args, data: &std::path::Path) -> anyhow::Result<(f64, f64)> {
    let setup = format!(
        "create table pgb_users (id int primary key, state text not null default 'active');
         insert into pgb_users select g from generate_series(0, {}) g;
         create table pgb_servers (id bigserial primary key, user_id int not null,
             name text not null, state text not null, job uuid, unique (user_id, name));
         create table pgb_jobs (id uuid primary key, kind text not null, payload jsonb not null,
             created_at timestamptz not null default now());
         create table pgb_queue (id bigserial primary key, job bytea not null,
             status text not null default 'Pending', run_at timestamptz not null default now());
         create table pgb_events (id bigserial primary key, job_id uuid not null, message text);",
        args.users - 1
    );
    let status = Command::new("psql")
        .args(["-q", "-v", "ON_ERROR_STOP=1", url, "-c", &setup])
        .stdout(Stdio::null())
        .status()
        .context("psql (Debian's postgresql-client)")?;
    if !status.success() {
        bail!("creating pgbench's tables failed");
    }
    let script = data.with_extension("sql");
    std::fs::write(
        &script,
        format!(
            "\\set u random(0, {})
begin;
select id, state from pgb_users where id = :u for update;
insert into pgb_servers (user_id, name, state) values (:u, md5(random()::text), 'stopped')
  on conflict (user_id, name) do update set state = pgb_servers.state returning id as server \\gset
select count(*) from pgb_servers where user_id = :u and state in ('pending_spawn', 'running');
insert into pgb_jobs (id, kind, payload) values (gen_random_uuid(), 'spawn', '{{}}');
insert into pgb_queue (job) values ('\\x00');
update pgb_servers set state = 'pending_spawn' where id = :server;
insert into pgb_events (job_id, message) values (gen_random_uuid(), 'requested');
commit;
",
            args.users - 1
        ),
    )?;
    let out = Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-j", "2"])
        .arg(format!("-c{}", args.connections))
        .arg(format!("-T{}", args.seconds))
        .arg("-f")
        .arg(&script)
        .arg(url)
        .output()
        .context("pgbench (Debian's postgresql-contrib)")?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&out.stdout);
    let figure = |prefix: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))?
            .split_whitespace()
            .find_map(|w| w.parse().ok())
    };
    match (figure("tps"), figure("latency average")) {
        (Some(tps), Some(latency)) => Ok((tps, latency)),
        _ => bail!(
            "pgbench's output: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}
