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
            describe();
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

/// Every family's help text, and the job counters at 0 for every kind, so that a
/// rate over them works from the first scrape (Prometheus's conventions; an
/// absent series is not a zero).
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "berth_jobs_enqueued_total",
        "Jobs this process enqueued, by kind."
    );
    describe_counter!(
        "berth_jobs_started_total",
        "Jobs this process began running, by kind."
    );
    describe_counter!(
        "berth_jobs_succeeded_total",
        "Jobs that succeeded, counted by the process that ended them, by kind."
    );
    describe_counter!(
        "berth_jobs_failed_total",
        "Jobs that failed for good, counted by the process that ended them, by kind."
    );
    describe_counter!(
        "berth_jobs_cancelled_total",
        "Jobs cancelled (by an operator, or no longer wanted), by kind."
    );
    describe_histogram!(
        "berth_job_duration_seconds",
        Unit::Seconds,
        "Time from a job's start to its end, by kind."
    );
    describe_histogram!(
        "berth_spawn_latency_seconds",
        Unit::Seconds,
        "Time from a spawn request to its server answering."
    );
    describe_histogram!(
        "berth_http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by method, route template and status."
    );
    describe_gauge!(
        "berth_spawn_slots_in_use",
        "Spawns in flight, platform-wide."
    );
    describe_gauge!(
        "berth_spawn_slot_limit",
        "Spawns allowed in flight at once."
    );
    describe_gauge!(
        "berth_active_servers",
        "Servers pending or running, platform-wide."
    );
    describe_gauge!(
        "berth_active_server_limit",
        "Servers allowed pending or running at once."
    );
    describe_gauge!("berth_spawns_waiting", "Spawns waiting for a spawn slot.");
    describe_gauge!(
        "berth_queue_depth",
        "Jobs queued and not yet started, by queue."
    );
    describe_gauge!(
        "berth_workers_alive",
        "Workers heard from within the last minute."
    );
    for kind in JobKind::ALL {
        for name in [
            "berth_jobs_enqueued_total",
            "berth_jobs_started_total",
            "berth_jobs_succeeded_total",
            "berth_jobs_failed_total",
            "berth_jobs_cancelled_total",
        ] {
            metrics::counter!(name, "kind" => kind.as_str()).increment(0);
        }
    }
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
