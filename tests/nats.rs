//! What only the NATS backend has to prove: a broker restart in the middle of a
//! burst loses and doubles nothing, and a job that keeps losing its worker ends in
//! the dead-letter path instead of vanishing.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{OwnNats, TestEnv, wait_for};
use reqwest::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_restart_during_a_burst_of_100_spawns_loses_and_doubles_nothing() {
    let mut nats = OwnNats::start().await;
    let url = nats.url.clone();
    // A production-like acknowledgement window: a worker's signs of life during the
    // outage are lost, but the window outlasts the outage and reconnect.
    let mut env = TestEnv::on_nats(|n| {
        n.url = url;
        n.ack_wait = Duration::from_secs(10);
    })
    .await;
    let (status, body) = env
        .call(
            Method::PATCH,
            "/api/v1/admin/limits",
            Some(r#"{"concurrent_spawn_limit": 20, "active_server_limit": 120}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for _ in 0..2 {
        env.start_worker_process(&["--poll-interval-ms", "100"]);
    }
    let users: Vec<String> = (0..100).map(|i| env.user(&format!("b{i}"))).collect();
    for user in &users {
        env.create_user(user).await;
    }

    // The burst: 100 spawn requests at once; the broker dies once a third of them
    // are answered and comes back two seconds later.
    let answered = Arc::new(AtomicUsize::new(0));
    let requests: Vec<_> = users
        .iter()
        .map(|user| {
            let http = env.http().clone();
            let url = format!("{}/api/v1/users/{user}/server", env.base);
            let answered = answered.clone();
            tokio::spawn(async move {
                let response = http
                    .post(url)
                    .bearer_auth(common::TOKEN)
                    .send()
                    .await
                    .expect("the API answers");
                answered.fetch_add(1, Ordering::SeqCst);
                response.status()
            })
        })
        .collect();
    wait_for(
        "a third of the burst answered",
        Duration::from_secs(30),
        async || answered.load(Ordering::SeqCst) >= 33,
    )
    .await;
    nats.kill();
    // Recorded while the broker is down: the request still answers 202 (the job is
    // in the outbox) after the publish timeout.
    let late = env.user("late");
    env.create_user(&late).await;
    let (status, body) = env
        .call(Method::POST, &format!("/api/v1/users/{late}/server"), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert!(
        env.count("select count(*) from outbox").await >= 1,
        "the job waits in the outbox while the broker is down"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart().await;

    for request in requests {
        assert_eq!(request.await.unwrap(), StatusCode::ACCEPTED);
    }
    wait_for(
        "all 101 servers running",
        Duration::from_secs(150),
        async || env.running_servers().await == 101,
    )
    .await;

    // None lost: every job succeeded. None doubled: every job held a spawn slot
    // exactly once, was begun by one delivery (attempts beyond 1 only for engine
    // errors retried in-handler, which keep their error), every server has exactly
    // one container, and the outbox and the stream hold nothing more.
    let jobs: Vec<(String, i32, Option<String>)> =
        sqlx::query_as("select state, attempts, last_error from jobs where kind = 'spawn'")
            .fetch_all(env.pool())
            .await
            .unwrap();
    assert_eq!(jobs.len(), 101);
    assert!(
        jobs.iter().all(|(state, ..)| state == "succeeded"),
        "{jobs:?}"
    );
    let again: Vec<_> = jobs
        .iter()
        .filter(|(_, attempts, error)| *attempts != 1 && error.is_none())
        .collect();
    assert!(again.is_empty(), "every job begun once: {again:?}");
    assert_eq!(
        env.count("select count(*) from (select job_id from spawn_attempts group by job_id having count(*) > 1) twice")
            .await,
        0,
        "a job held a slot twice"
    );
    assert_eq!(
        env.count("select count(distinct job_id) from spawn_attempts")
            .await,
        101
    );
    let mut containers = env.containers();
    containers.sort();
    containers.dedup();
    assert_eq!(containers.len(), 101, "one container per server");
    assert_eq!(env.count("select count(*) from outbox").await, 0);
    let stream = common::stream_state(&env).await;
    assert_eq!(stream.messages, 0, "every message acknowledged: {stream:?}");
    assert!(
        stream.last_sequence >= 101,
        "every job went through the stream: {stream:?}"
    );
    assert!(env.peak_spawns_in_flight().await <= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_keeps_losing_its_worker_is_dead_lettered() {
    let mut env = TestEnv::on_nats(|n| {
        n.max_deliver = 1;
        n.ack_wait = Duration::from_secs(2);
    })
    .await;
    let doomed = env.start_worker_process(&["--server-env", "BERTH_TEST_START_DELAY=30"]);
    let user = env.user("dora");
    let (path, job_path) = env.spawn_until_container(&user).await;
    env.kill_worker(doomed);
    // A live worker hears the broker give up on the only delivery allowed.
    env.start_worker(&["--reconcile-interval", "1"]);

    let server = env
        .wait_server(&path, Duration::from_secs(30), |s| s["state"] == "failed")
        .await;
    let (_, job) = env.call(Method::GET, &job_path, None).await;
    assert_eq!(job["state"], "failed", "{job}");
    let error = job["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("gave up after 1 deliveries"), "{job}");
    assert!(
        server["error"]
            .as_str()
            .unwrap_or_default()
            .contains("gave up"),
        "{server}"
    );
    let (_, limits) = env.call(Method::GET, "/api/v1/admin/limits", None).await;
    assert_eq!(
        limits["usage"]["active_servers"], 0,
        "its place is given back: {limits}"
    );
    wait_for(
        "the reconciler to remove the dead spawn's container",
        Duration::from_secs(20),
        async || env.containers().is_empty(),
    )
    .await;
    // The user can try again, and this time it works.
    let (status, again) = env.call(Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    env.wait_server(&path, Duration::from_secs(30), |s| s["state"] == "running")
        .await;
}
