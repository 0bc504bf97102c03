//! What the benchmarks do and measure alike: users and a burst of spawn requests
//! against an API, memory of a process, percentiles.

use std::{
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// Processes a benchmark started, killed when it ends however it ends.
pub struct Processes(pub Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Resident memory of a process, KiB (0 when it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    kib_field(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// A process's proportional share of resident memory, KiB (0 when it is gone):
/// each page it shares with other processes counted as a share of it, so that the
/// sum over processes running one binary counts its pages once (their RSS each
/// count all of them: about 12 MiB of a Berth process's RSS is the binary's).
pub fn pss_kib(pid: u32) -> u64 {
    kib_field(&format!("/proc/{pid}/smaps_rollup"), "Pss:")
}

/// The figure of the line of `/proc` file `path` that starts with `key`.
fn kib_field(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// CPU time a process has used, user and system, ms (0 when it is gone).
pub fn cpu_ms(pid: u32) -> u64 {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // After the command's name in parentheses: utime and stime are the
            // 12th and 13th fields.
            let rest = s.rsplit_once(')')?.1.to_owned();
            let fields: Vec<u64> = rest
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|f| f.parse().ok())
                .collect();
            Some(fields.iter().sum::<u64>())
        })
        .unwrap_or(0);
    // USER_HZ is 100 on Linux.
    ticks * 10
}

/// The machine's CPU time so far, busy and all, ms (from /proc/stat's first line).
pub fn machine_cpu_ms() -> (u64, u64) {
    let line = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = line
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let all: u64 = ticks.iter().sum();
    // idle and iowait are the 4th and 5th.
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    ((all - idle) * 10, all * 10)
}

/// The PIDs of processes with this command name.
pub fn pids_named(name: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}

/// The `p` quantile (0..=1) of sorted figures.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Creates the users through the API, 50 requests at a time.
pub async fn create_users(
    client: &reqwest::Client,
    api: &str,
    token: &str,
    users: &[String],
) -> anyhow::Result<()> {
    for chunk in users.chunks(50) {
        futures::future::try_join_all(chunk.iter().map(|u| {
            client
                .post(format!("{api}/users/{u}"))
                .bearer_auth(token)
                .send()
        }))
        .await?;
    }
    Ok(())
}

/// What a burst of spawn requests got.
pub struct Burst {
    /// From the first request to the last answer.
    pub answered_in: Duration,
    /// Each request's time to its answer, ms, sorted.
    pub latencies: Vec<f64>,
    pub accepted: usize,
    pub refused: usize,
    /// The users whose request was accepted.
    pub admitted: Vec<String>,
}

/// Every user asks for their default server at the same moment.
pub async fn spawn_burst(
    client: &reqwest::Client,
    api: &str,
    token: &str,
    users: &[String],
) -> Burst {
    let first = Instant::now();
    let answers = futures::future::join_all(users.iter().map(|u| {
        let client = client.clone();
        let url = format!("{api}/users/{u}/server");
        async move {
            let sent = Instant::now();
            let status = client
                .post(url)
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status().as_u16());
            (status, sent.elapsed())
        }
    }))
    .await;
    let answered_in = first.elapsed();
    let mut latencies: Vec<f64> = answers
        .iter()
        .map(|(_, d)| d.as_secs_f64() * 1000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    Burst {
        answered_in,
        latencies,
        accepted: answers.iter().filter(|(s, _)| matches!(s, Ok(202))).count(),
        admitted: users
            .iter()
            .zip(&answers)
            .filter(|(_, (s, _))| matches!(s, Ok(202)))
            .map(|(u, _)| u.clone())
            .collect(),
        refused: answers.iter().filter(|(s, _)| matches!(s, Ok(429))).count(),
    }
}

/// A free TCP port on the loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until `url` answers at all (30 s at most).
pub async fn wait_answers(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    for _ in 0..300 {
        if http.get(url).send().await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{url} did not answer")
}

/// Runs wrk (2 threads, latency percentiles) with `extra` arguments (a header, a
/// script): requests per second, p50 and p99 in ms. Any answer that is not 2xx
/// fails the run.
pub fn wrk(
    url: &str,
    extra: &[&str],
    connections: usize,
    seconds: u64,
) -> anyhow::Result<(f64, f64, f64)> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "--latency"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"));
    cmd.args(extra);
    let out = cmd
        .arg(url)
        .output()
        .context("wrk (Debian's wrk package)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") {
        bail!("{url}: answers that are not 2xx\n{text}");
    }
    let number = |line: &str| -> Option<f64> {
        let value = line.split_whitespace().nth(1)?;
        let (digits, unit) = value.split_at(value.find(|c: char| c.is_alphabetic())?);
        let n: f64 = digits.parse().ok()?;
        Some(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => return None,
        })
    };
    let rate = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .with_context(|| format!("wrk's output: {text}"))?;
    let p = |q: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(q))
            .and_then(number)
            .unwrap_or(f64::NAN)
    };
    Ok((rate, p("50%"), p("99%")))
}

/// A database of one benchmark run on the server of `server_url` (a superuser
/// URL), dropped by `remove` at the end however the run ended.
pub struct BenchDatabase {
    admin: sqlx::PgPool,
    name: String,
    /// The URL of the new database.
    pub url: String,
}

impl BenchDatabase {
    pub async fn create(server_url: &str, prefix: &str) -> anyhow::Result<Self> {
        let admin = sqlx::PgPool::connect(server_url).await?;
        let name = format!("{prefix}_{}", std::process::id());
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&admin)
            .await?;
        let base = server_url.rsplit_once('/').map_or(server_url, |(b, _)| b);
        let url = format!("{base}/{name}");
        Ok(Self { admin, name, url })
    }

    pub async fn remove(self) {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop database if exists {} with (force)",
            self.name
        )))
        .execute(&self.admin)
        .await;
    }
}
