//! What the benchmarks do and measure alike: users and a burst of spawn requests
//! against an API, memory of a process, percentiles.

use std::{
    process::Child,
    time::{Duration, Instant},
};

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
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
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
        refused: answers.iter().filter(|(s, _)| matches!(s, Ok(429))).count(),
    }
}
