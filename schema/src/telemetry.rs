//! Prometheus metrics shared by every process. The counters of a job's life are
//! kept where the store records it (enqueued, begun, ended), so each process counts
//! exactly the transitions it made, whichever queue backend carried the job.

use std::{sync::OnceLock, time::Duration};

use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::jobs::{JobKind, JobState};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Seconds: from a few milliseconds (HTTP) to minutes (slow spawns).
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Installs the process's recorder once (later calls return the same handle) and
/// keeps its histograms drained. Call from within a Tokio runtime.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&BUCKETS)
                .expect("buckets are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            let upkeep = handle.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    upkeep.run_upkeep();
                }
            });
            handle
        })
        .clone()
}

pub(crate) fn job_enqueued(kind: JobKind) {
    metrics::counter!("berth_jobs_enqueued_total", "kind" => kind.as_str()).increment(1);
}

pub(crate) fn job_started(kind: JobKind) {
    metrics::counter!("berth_jobs_started_total", "kind" => kind.as_str()).increment(1);
}

/// A job reached a final state here: counted by kind and state, with its run time
/// and, for a spawn that succeeded, the time from request to ready.
pub(crate) fn job_ended(
    kind: JobKind,
    state: JobState,
    created: DateTime<Utc>,
    started: Option<DateTime<Utc>>,
    finished: DateTime<Utc>,
) {
    let name = match state {
        JobState::Succeeded => "berth_jobs_succeeded_total",
        JobState::Failed => "berth_jobs_failed_total",
        JobState::Cancelled | JobState::Queued | JobState::Running => "berth_jobs_cancelled_total",
    };
    metrics::counter!(name, "kind" => kind.as_str()).increment(1);
    if let Some(started) = started {
        metrics::histogram!("berth_job_duration_seconds", "kind" => kind.as_str())
            .record(seconds(finished - started));
    }
    if kind == JobKind::Spawn && state == JobState::Succeeded {
        metrics::histogram!("berth_spawn_latency_seconds").record(seconds(finished - created));
    }
}

fn seconds(d: chrono::TimeDelta) -> f64 {
    d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}
