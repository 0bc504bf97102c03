//! Queue throughput: N jobs enqueued by P producers exactly as the API enqueues
//! (a Postgres transaction through the `Queue` interface, then `flush`), drained by
//! W workers of C jobs each running a no-op handler, through each backend in one
//! run. Reports enqueue rate, jobs per second end to end, and enqueue-to-start
//! latency p50/p99/max.
//!
//!     cargo run --release -p bench --bin queues -- --jobs 5000 --workers 4
//!
//! `--prefill` enqueues every job before the workers start and reports how fast they
//! drain the queue; with `--reference pgqueuer` the same drain by pgqueuer (PyPI, in a
//! venv made on first use) runs on the same Postgres in the same run, and the ratio is
//! printed. `--rate R` paces the producers to R jobs a second (latency at a steady load).
//!
//! Needs Postgres (BERTH_BENCH_DATABASE_URL, a superuser URL) and a nats-server
//! with JetStream (BERTH_BENCH_NATS_URL). The backends `sqlite`, `sqlite-normal` and
//! `sqlite-off` run the embedded store's queue (a job row and its queue entry per
//! transaction, as its requests write them; drained by its consumer loop) with
//! `synchronous` FULL (Berth's choice), NORMAL or OFF, in a temporary directory.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use apalis::prelude::{BoxDynError, Data, WorkerBuilder, WorkerBuilderExt};
use clap::Parser;
use schema::{
    JobEnvelope, JobKind, QueueSettings, jobs::SPAWN_QUEUE, nats::NatsSettings, queue::Queue,
};
use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5000)]
    jobs: usize,
    /// Concurrent producers (API requests in flight).
    #[arg(long, default_value_t = 16)]
    producers: usize,
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Jobs in flight per worker.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Which backends, in order.
    #[arg(long, value_delimiter = ',', default_value = "postgres,nats")]
    backends: Vec<String>,
    /// Enqueue every job first, then start the workers: the drain rate.
    #[arg(long)]
    prefill: bool,
    /// Producers together enqueue at most this many jobs a second.
    #[arg(long)]
    rate: Option<f64>,
    /// A reference run in the same sitting: `pgqueuer` (drain of a pre-filled queue).
    #[arg(long)]
    reference: Option<String>,
    #[arg(
        long,
        env = "BERTH_BENCH_DATABASE_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    #[arg(
        long,
        env = "BERTH_BENCH_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
}

/// When each job was enqueued, and how long until a worker started it.
#[derive(Default)]
struct Record {
    enqueued: Mutex<HashMap<Uuid, Instant>>,
    latencies: Mutex<Vec<Duration>>,
    /// Jobs that waited over a second: when they were enqueued, and how long.
    slow: Mutex<Vec<(Instant, Duration)>>,
    /// The longest an enqueue (transaction, commit, notice) took.
    slowest_enqueue: Mutex<Duration>,
    started: AtomicUsize,
    all_started: tokio::sync::Notify,
    first_enqueue: Mutex<Option<Instant>>,
    expected: usize,
    last_start: Mutex<Option<Instant>>,
}

impl Record {
    fn start(&self, job: Uuid) {
        let now = Instant::now();
        let Some(at) = self.enqueued.lock().unwrap().get(&job).copied() else {
            return;
        };
        self.latencies.lock().unwrap().push(now - at);
        if now - at > Duration::from_secs(1) {
            self.slow.lock().unwrap().push((at, now - at));
        }
        *self.last_start.lock().unwrap() = Some(now);
        if self.started.fetch_add(1, Ordering::SeqCst) + 1 == self.expected {
            self.all_started.notify_one();
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "{} jobs, {} producers, {} workers x {} in flight, no-op handler",
        args.jobs, args.producers, args.workers, args.concurrency
    );
    println!(
        "{:<13} {:>10} {:>12} {:>9} {:>9} {:>9}",
        "backend", "enqueue/s", "jobs/s", "p50 ms", "p99 ms", "max ms"
    );
    let mut postgres_drain = None;
    for backend in &args.backends {
        let rate = run(&args, backend).await?;
        if backend == "postgres" {
            postgres_drain = Some(rate);
        }
    }
    if args.reference.as_deref() == Some("pgqueuer") {
        let reference = pgqueuer(&args).await?;
        println!("{:<13} {:>10} {:>12.0}", "pgqueuer", "", reference);
        if let Some(berth) = postgres_drain {
            println!(
                "Berth on Postgres / pgqueuer, {}: {:.2}x",
                if args.prefill {
                    "draining a pre-filled queue"
                } else {
                    "jobs/s"
                },
                berth / reference
            );
        }
    }
    Ok(())
}

/// pgqueuer's drain of `args.jobs` pre-filled no-op jobs by `args.workers` worker
/// processes fetching `args.concurrency` at a time, on a fresh database of the same
/// Postgres: jobs per second.
async fn pgqueuer(args: &Args) -> anyhow::Result<f64> {
    let venv = std::env::var("BERTH_BENCH_PGQUEUER_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/berth-pgqueuer",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let python = format!("{venv}/bin/python");
    if !std::path::Path::new(&python).exists() {
        eprintln!("installing pgqueuer into {venv}");
        let made = std::process::Command::new("python3")
            .args(["-m", "venv", &venv])
            .status()?;
        anyhow::ensure!(made.success(), "python3 -m venv {venv}");
        let installed = std::process::Command::new(format!("{venv}/bin/pip"))
            .args(["install", "--quiet", "pgqueuer==1.6.0", "asyncpg"])
            .status();
        if !installed.is_ok_and(|s| s.success()) {
            let any = std::process::Command::new(format!("{venv}/bin/pip"))
                .args(["install", "--quiet", "pgqueuer", "asyncpg"])
                .status()?;
            anyhow::ensure!(any.success(), "pip install pgqueuer");
        }
    }
    let (admin, url, db) = fresh_database(args).await?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/reference/pgqueuer_drain.py");
    let output = tokio::process::Command::new(&python)
        .arg(script)
        .args(["--dsn", &url])
        .args(["--jobs", &args.jobs.to_string()])
        .args(["--workers", &args.workers.to_string()])
        // Fetching as many at a time as a Berth worker does (apalis's batch is its
        // concurrency).
        .args(["--batch", &args.concurrency.to_string()])
        .output()
        .await?;
    drop_database(&admin, &db).await?;
    anyhow::ensure!(
        output.status.success(),
        "pgqueuer: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = String::from_utf8_lossy(&output.stdout);
    let result: serde_json::Value = serde_json::from_str(line.trim().lines().last().unwrap_or(""))?;
    anyhow::ensure!(result["left"] == 0, "pgqueuer left jobs: {result}");
    result["per_second"].as_f64().context("pgqueuer's rate")
}

/// A database of its own on the bench's Postgres: the admin pool, its URL, its name.
async fn fresh_database(args: &Args) -> anyhow::Result<(PgPool, String, String)> {
    let db = format!("berth_bench_q_{:08x}", rand::random::<u32>());
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
    Ok((admin, url, db))
}

async fn drop_database(admin: &PgPool, db: &str) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "drop database if exists {db} with (force)"
    )))
    .execute(admin)
    .await?;
    Ok(())
}

/// One backend's run; its jobs per second (the drain rate with `--prefill`).
async fn run(args: &Args, backend: &str) -> anyhow::Result<f64> {
    let durability = match backend {
        "sqlite" => Some(schema::lite::Durability::Full),
        "sqlite-normal" => Some(schema::lite::Durability::Normal),
        "sqlite-off" => Some(schema::lite::Durability::Off),
        _ => None,
    };
    if let Some(durability) = durability {
        let dir = std::env::temp_dir().join(format!("berth-bench-q-{:08x}", rand::random::<u32>()));
        let result = measure_sqlite(args, backend, &dir, durability).await;
        let _ = std::fs::remove_dir_all(&dir);
        return result;
    }
    let (admin, url, db) = fresh_database(args).await?;
    let tag = db.trim_start_matches("berth_bench_q_").to_owned();
    let result = measure(args, backend, &url, &tag).await;
    drop_database(&admin, &db).await?;
    result
}

async fn measure(args: &Args, backend: &str, url: &str, tag: &str) -> anyhow::Result<f64> {
    let pool = PgPoolOptions::new()
        .max_connections(args.producers as u32 + 4)
        .connect(url)
        .await?;
    schema::migrate(&pool).await?;
    let settings = match backend {
        "postgres" => QueueSettings::Postgres,
        "nats" => QueueSettings::Nats(NatsSettings::new(&args.nats_url, format!("bench_{tag}"))),
        other => anyhow::bail!("unknown backend {other}"),
    };
    let stop = CancellationToken::new();
    let (queue, broker) = settings.open(&pool, stop.clone()).await?;
    if let Some(broker) = &broker {
        broker.ensure_all(&stop).await?;
    }
    let record = Arc::new(Record {
        expected: args.jobs,
        ..Default::default()
    });

    // Workers idle and waiting, as in production; or, with `--prefill`, started
    // once every job is on the queue.
    let start_workers = || async {
        let mut workers = Vec::new();
        for w in 0..args.workers {
            let record = record.clone();
            let stop = stop.clone();
            let concurrency = args.concurrency;
            match &broker {
                Some(broker) => {
                    let settings = broker.settings.clone();
                    let own = schema::nats::Broker::connect(settings).await?;
                    workers.push(tokio::spawn(async move {
                        let _ = workers::jetstream::pull(
                            own,
                            SPAWN_QUEUE,
                            concurrency,
                            stop,
                            move |m| {
                                let record = record.clone();
                                async move {
                                    if let Ok(e) = serde_json::from_slice::<JobEnvelope>(&m.payload)
                                    {
                                        record.start(e.job_id);
                                    }
                                    let _ = m.ack().await;
                                }
                            },
                        )
                        .await;
                    }));
                }
                None => {
                    let pool = PgPoolOptions::new().max_connections(8).connect(url).await?;
                    workers.push(tokio::spawn(async move {
                        // The backend of `berth worker`: NOTIFY plus a 250 ms poll.
                        let backend = workers::queue_backend(
                            &pool,
                            SPAWN_QUEUE,
                            concurrency,
                            Duration::from_secs(5),
                            3,
                            Duration::from_millis(250),
                        );
                        let _ = WorkerBuilder::new(format!("bench-{w}"))
                            .backend(backend)
                            .data(record)
                            .concurrency(concurrency)
                            .build(noop)
                            .run_until(async move {
                                stop.cancelled().await;
                                Ok::<(), std::io::Error>(())
                            })
                            .await;
                    }));
                }
            }
        }
        anyhow::Ok(workers)
    };

    let producing = (pool.clone(), queue.clone());
    let enqueue_one = move |record: Arc<Record>| {
        let (pool, queue) = producing.clone();
        async move { enqueue(&pool, queue.as_ref(), &record).await }
    };
    let (workers, enqueued_in, drained_in) = if args.prefill {
        let enqueued_in = produce(args, &record, enqueue_one).await?;
        let began = Instant::now();
        let workers = start_workers().await?;
        drained(&record, began).await?;
        // Drained means acknowledged, as pgqueuer counts it: no task left undone.
        if broker.is_none() {
            loop {
                let open: i64 =
                    sqlx::query_scalar("select count(*) from apalis.jobs where status <> 'Done'")
                        .fetch_one(&pool)
                        .await?;
                if open == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        (workers, enqueued_in, began.elapsed())
    } else {
        let workers = start_workers().await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let began = Instant::now();
        let enqueued_in = produce(args, &record, enqueue_one).await?;
        (workers, enqueued_in, drained(&record, began).await?)
    };
    stop.cancel();
    for worker in workers {
        let _ = worker.await;
    }
    if let Some(broker) = broker {
        let _ = broker
            .jetstream
            .delete_stream(&broker.settings.stream)
            .await;
    }

    let rate = report(args, backend, &record, enqueued_in, drained_in);
    pool.close().await;
    Ok(rate)
}

/// Prints the backend's line; returns its jobs per second.
fn report(
    args: &Args,
    backend: &str,
    record: &Record,
    enqueued_in: Duration,
    drained_in: Duration,
) -> f64 {
    let rate = args.jobs as f64 / drained_in.as_secs_f64();
    if args.prefill {
        // Every job waited for the workers to start: latency says nothing here.
        println!(
            "{:<13} {:>10.0} {:>12.0} {:>9} {:>9} {:>9}",
            backend,
            args.jobs as f64 / enqueued_in.as_secs_f64(),
            rate,
            "-",
            "-",
            "-"
        );
        return rate;
    }
    let mut latencies = std::mem::take(&mut *record.latencies.lock().unwrap());
    latencies.sort();
    let slow = record.slow.lock().unwrap();
    if let (Some(first), Some(last)) = (
        slow.iter().map(|s| s.0).min(),
        slow.iter().map(|s| s.0).max(),
    ) {
        let begun = record.first_enqueue.lock().unwrap().unwrap_or(first);
        eprintln!(
            "  {backend}: {} jobs waited over 1 s, enqueued {:.2}–{:.2} s into the run; \
             the slowest enqueue took {:.0} ms",
            slow.len(),
            (first - begun).as_secs_f64(),
            (last - begun).as_secs_f64(),
            record.slowest_enqueue.lock().unwrap().as_secs_f64() * 1e3
        );
    }
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    println!(
        "{:<13} {:>10.0} {:>12.0} {:>9.1} {:>9.1} {:>9.1}",
        backend,
        args.jobs as f64 / enqueued_in.as_secs_f64(),
        rate,
        at(0.5),
        at(0.99),
        at(1.0),
    );
    rate
}

/// The embedded store's queue: producers write a job and its queue entry per
/// transaction; W consumer loops of `berth up` (`workers::embedded::consume_with`)
/// take them and acknowledge at once.
async fn measure_sqlite(
    args: &Args,
    backend: &str,
    dir: &std::path::Path,
    durability: schema::lite::Durability,
) -> anyhow::Result<f64> {
    let store = schema::SqliteStore::open_with(dir, durability).await?;
    let record = Arc::new(Record {
        expected: args.jobs,
        ..Default::default()
    });
    let stop = CancellationToken::new();
    let db = schema::Db::from(store.clone());
    let enqueue_one = move |record: Arc<Record>| {
        let db = db.clone();
        async move {
            let id = Uuid::now_v7();
            record.enqueued.lock().unwrap().insert(id, Instant::now());
            db.enqueue(id, JobKind::Spawn, "bench", serde_json::json!({}))
                .await?;
            anyhow::Ok(())
        }
    };
    let mut enqueued_in = Duration::ZERO;
    if args.prefill {
        enqueued_in = produce(args, &record, enqueue_one.clone()).await?;
    }
    let began = Instant::now();
    let mut consumers = Vec::new();
    for w in 0..args.workers {
        let (store, record) = (store.clone(), record.clone());
        let acking = store.clone();
        consumers.push(tokio::spawn(workers::embedded::consume_with(
            store,
            SPAWN_QUEUE,
            args.concurrency,
            format!("bench-{w}"),
            stop.clone(),
            move |delivery| {
                let (record, store) = (record.clone(), acking.clone());
                async move {
                    record.start(delivery.envelope.job_id);
                    let _ = store.ack(delivery.envelope.job_id).await;
                }
            },
        )));
    }
    let began = if args.prefill {
        began
    } else {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let began = Instant::now();
        enqueued_in = produce(args, &record, enqueue_one).await?;
        began
    };
    let drained_in = drained(&record, began).await?;
    stop.cancel();
    for consumer in consumers {
        let _ = consumer.await;
    }
    Ok(report(args, backend, &record, enqueued_in, drained_in))
}

/// `args.jobs` jobs enqueued by `args.producers` producers at once, each through
/// `enqueue_one` (at most `args.rate` a second together); how long it took.
async fn produce<F, Fut>(
    args: &Args,
    record: &Arc<Record>,
    enqueue_one: F,
) -> anyhow::Result<Duration>
where
    F: Fn(Arc<Record>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    let rate = args.rate;
    let producers: Vec<_> = (0..args.producers)
        .map(|_| {
            let (record, next, enqueue_one) = (record.clone(), next.clone(), enqueue_one.clone());
            let jobs = args.jobs;
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= jobs {
                        break;
                    }
                    if let Some(rate) = rate {
                        let due = began + Duration::from_secs_f64(i as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    enqueue_one(record.clone()).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for producer in producers {
        producer.await??;
    }
    Ok(began.elapsed())
}

/// Waits until every job has started; how long after `began` the last one did.
async fn drained(record: &Record, began: Instant) -> anyhow::Result<Duration> {
    if record.started.load(Ordering::SeqCst) < record.expected {
        tokio::time::timeout(Duration::from_secs(600), record.all_started.notified())
            .await
            .context("not every job started within 10 minutes")?;
    }
    Ok(record.last_start.lock().unwrap().expect("a start") - began)
}

/// One job, as the API enqueues it: a transaction through the `Queue`, a commit,
/// the queue's notice (apalis's new-task event), then `flush` (which, on NATS, waits
/// for the broker's acknowledgement).
async fn enqueue(pool: &PgPool, queue: &dyn Queue, record: &Record) -> anyhow::Result<()> {
    let job = JobEnvelope {
        job_id: Uuid::now_v7(),
        kind: JobKind::Spawn,
    };
    let began = Instant::now();
    record.first_enqueue.lock().unwrap().get_or_insert(began);
    record.enqueued.lock().unwrap().insert(job.job_id, began);
    let mut tx = pool.begin().await?;
    queue
        .enqueue(schema::db::Dialect::Pg(&mut *tx), &job, chrono::Utc::now())
        .await?;
    tx.commit().await?;
    // What the store's notifying task sends for the API after the commit (its
    // own transaction, which does not wait for the disk).
    if let Some(notice) = queue.notice(&job) {
        schema::pg_notify::send_now(pool, vec![notice]).await;
    }
    queue.flush().await;
    let took = began.elapsed();
    let mut slowest = record.slowest_enqueue.lock().unwrap();
    *slowest = (*slowest).max(took);
    Ok(())
}

async fn noop(envelope: JobEnvelope, record: Data<Arc<Record>>) -> Result<(), BoxDynError> {
    record.start(envelope.job_id);
    Ok(())
}
