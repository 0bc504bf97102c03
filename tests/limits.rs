//! Global limits across independently scaled workers, and crash safety.

mod common;

use std::{collections::HashSet, time::Duration};

use common::{Backend, TestEnv, wait_for};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn a_storm_of_200_spawns_on_3_workers_holds_both_limits(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    for _ in 0..3 {
        // The default pool (4 x concurrency + 8): a starved pool turns into
        // errors and second deliveries, which this test counts.
        env.start_worker_process(&["--server-env", "BERTH_TEST_START_DELAY=2"]);
    }
    let users: Vec<String> = (0..200).map(|i| env.user(&format!("s{i}"))).collect();
    futures::future::join_all(users.iter().map(|u| env.create_user(u))).await;

    let paths: Vec<String> = users
        .iter()
        .map(|u| format!("/api/v1/users/{u}/server"))
        .collect();
    let answers =
        futures::future::join_all(paths.iter().map(|p| env.call(Method::POST, p, None))).await;
    let accepted = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::ACCEPTED)
        .count();
    let full: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(accepted, 50, "exactly the active-server limit is admitted");
    assert_eq!(
        full.len(),
        150,
        "every other request is told the platform is full"
    );
    assert!(
        full.iter().all(|b| b["message"]
            .as_str()
            .unwrap()
            .contains("the platform is full")),
        "{:?}",
        full[0]
    );

    wait_for("50 running servers", Duration::from_secs(120), async || {
        env.running_servers().await == 50
    })
    .await;

    let peak = env.peak_spawns_in_flight().await;
    assert!(
        peak <= 10,
        "at most 10 spawns were ever in flight, the record shows {peak}"
    );
    assert_eq!(peak, 10, "the limit was used in full");
    // Every admitted spawn held a slot. apalis may deliver a long-running spawn a
    // second time; such a delivery can still hold a slot for a moment before it finds
    // the job done, so grants may exceed 50 by a few, but never for a job that did
    // not succeed, and never a second container (checked below).
    assert_eq!(
        env.count("select count(distinct job_id) from spawn_attempts")
            .await,
        50,
        "every admitted spawn held a slot"
    );
    let extra = env.count("select count(*) from spawn_attempts").await - 50;
    assert!(extra <= 5, "{extra} second deliveries took a slot");
    assert_eq!(
        env.count("select count(*) from jobs where kind = 'spawn' and state = 'succeeded'")
            .await,
        50
    );
    assert_eq!(
        env.count("select count(*) from jobs where state <> 'succeeded'")
            .await,
        0,
        "no job lost or failed"
    );

    let containers: HashSet<String> = env.containers().into_iter().collect();
    let expected: HashSet<String> = sqlx::query_scalar::<_, String>(
        "select u.name from servers s join users u on u.id = s.user_id where s.state = 'running'",
    )
    .fetch_all(env.pool())
    .await
    .unwrap()
    .into_iter()
    .map(|user| env.container(&user))
    .collect();
    assert_eq!(
        containers, expected,
        "one container per running server, no orphans"
    );

    let (_, limits) = env.call(Method::GET, "/api/v1/admin/limits", None).await;
    assert_eq!(limits["usage"]["spawns_in_flight"], 0, "{limits}");
    assert_eq!(limits["usage"]["active_servers"], 50, "{limits}");
    let (_, workers) = env.call(Method::GET, "/api/v1/admin/workers", None).await;
    let alive = workers["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["alive"] == true)
        .count();
    assert_eq!(alive, 3, "{workers}");
}

async fn a_worker_killed_mid_spawn_is_taken_over_and_the_spawn_completes_once(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    let flags = |name: &str| {
        vec![
            "--worker-name".to_string(),
            name.to_string(),
            "--heartbeat".into(),
            "1".into(),
            "--missed-heartbeats".into(),
            "2".into(),
            "--poll-interval-ms".into(),
            "100".into(),
            "--reconcile-interval".into(),
            "1".into(),
            "--server-env".into(),
            "BERTH_TEST_START_DELAY=4".into(),
        ]
    };
    let names = [format!("w1-{}", env.id), format!("w2-{}", env.id)];
    let mut index = std::collections::HashMap::new();
    for name in &names {
        let args = flags(name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        index.insert(name.clone(), env.start_worker_process(&args));
    }
    let user = env.user("kim");
    // Mid-spawn: the container exists, the server is not ready yet.
    let (path, job_path) = env.spawn_until_container(&user).await;
    let (_, job) = env.call(Method::GET, &job_path, None).await;
    let first = job["worker"]
        .as_str()
        .expect("a worker took the job")
        .to_owned();
    env.kill_worker(index[&first]);
    let killed_at = tokio::time::Instant::now();

    let server = env
        .wait_server(&path, Duration::from_secs(40), |s| s["state"] == "running")
        .await;
    let took = killed_at.elapsed();
    let (_, job) = env.call(Method::GET, &job_path, None).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 2, "one attempt per worker: {job}");
    assert_ne!(job["worker"].as_str().unwrap(), first, "{job}");
    assert_eq!(
        env.containers(),
        vec![env.container(&user)],
        "exactly one container"
    );
    assert!(
        reqwest::get(server["internal_url"].as_str().unwrap())
            .await
            .is_ok()
    );
    // Takeover (about 3 s here) plus a fresh 4 s start.
    assert!(took < Duration::from_secs(30), "took over in {took:?}");

    wait_for(
        "the dead worker's slot record to close",
        Duration::from_secs(10),
        async || {
            env.count("select count(*) from spawn_attempts where ended_at is null")
                .await
                == 0
        },
    )
    .await;
    let (_, limits) = env.call(Method::GET, "/api/v1/admin/limits", None).await;
    assert_eq!(
        limits["usage"]["spawns_in_flight"], 0,
        "the slot is released: {limits}"
    );
    assert!(env.peak_spawns_in_flight().await <= 1);
}

async fn sigterm_lets_the_spawn_in_flight_finish_and_exits_0(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    let worker = env.start_worker_process(&[
        "--server-env",
        "BERTH_TEST_START_DELAY=2",
        "--shutdown-grace",
        "20",
    ]);
    let user = env.user("lee");
    env.create_user(&user).await;
    let path = format!("/api/v1/users/{user}/server");
    let (status, spawn) = env.call(Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    wait_for("the spawn to start", Duration::from_secs(20), async || {
        !env.containers().is_empty()
    })
    .await;

    let status = env.terminate_worker(worker, Duration::from_secs(25)).await;
    assert!(status.success(), "exit status {status:?}");
    // It finished what it held before it went.
    let (_, server) = env.call(Method::GET, &path, None).await;
    assert_eq!(server["state"], "running", "{server}");
    let (_, job) = env
        .call(
            Method::GET,
            &format!("/api/v1/jobs/{}", spawn["job_id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["attempts"], 1);
    let (_, workers) = env.call(Method::GET, "/api/v1/admin/workers", None).await;
    assert_eq!(workers["workers"][0]["alive"], false, "{workers}");
    assert!(workers["workers"][0]["stopped"].is_string(), "{workers}");
}

async fn admins_change_limits_at_runtime_and_spawns_over_them_wait(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    env.start_worker(&["--server-env", "BERTH_TEST_START_DELAY=1"]);

    let body = json!({ "concurrent_spawn_limit": 2, "active_server_limit": 4 }).to_string();
    let (status, limits) = env
        .call(Method::PATCH, "/api/v1/admin/limits", Some(&body))
        .await;
    assert_eq!(status, StatusCode::OK, "{limits}");
    assert_eq!(limits["concurrent_spawn_limit"], 2);
    assert_eq!(limits["active_server_limit"], 4);
    assert_eq!(limits["configured"]["active_server_limit"], 50);
    assert_eq!(limits["overridden"]["concurrent_spawn_limit"], true);

    let users: Vec<String> = (0..5).map(|i| env.user(&format!("r{i}"))).collect();
    for u in &users {
        env.create_user(u).await;
    }
    let mut accepted = 0;
    for u in &users {
        let (status, body) = env
            .call(Method::POST, &format!("/api/v1/users/{u}/server"), None)
            .await;
        match status {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(body["message"].as_str().unwrap().contains("of 4"), "{body}")
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(accepted, 4);
    // Over the spawn limit, spawns wait in the queue rather than fail.
    wait_for(
        "a spawn waiting for a slot",
        Duration::from_secs(10),
        async || {
            let (_, l) = env.call(Method::GET, "/api/v1/admin/limits", None).await;
            l["usage"]["spawns_in_flight"] == 2
                && l["usage"]["waiting_spawns"].as_i64().unwrap() >= 1
        },
    )
    .await;
    wait_for("4 running servers", Duration::from_secs(60), async || {
        env.running_servers().await == 4
    })
    .await;
    assert_eq!(env.peak_spawns_in_flight().await, 2);
    let attempts = env
        .count("select cast(coalesce(max(attempts), 0) as bigint) from jobs")
        .await;
    assert_eq!(attempts, 1, "waiting is not an attempt");
    // Oldest first: the two that found free slots started together; of the two that
    // waited, the younger never started while the older still waited (when both
    // slots free at once, both may go, in either order).
    let starts: Vec<(String, chrono::DateTime<chrono::Utc>)> = env
        .rows(
            "select j.user_name, a.started_at from spawn_attempts a join jobs j on j.id = a.job_id \
             order by a.started_at",
        )
        .await;
    let order: Vec<String> = starts.iter().map(|(u, _)| u.clone()).collect();
    let first: HashSet<&String> = order[..2].iter().collect();
    assert_eq!(
        first,
        users[..2].iter().collect::<HashSet<_>>(),
        "{order:?}"
    );
    let start_of = |u: &String| starts.iter().find(|(n, _)| n == u).unwrap().1;
    let (older, younger) = (start_of(&users[2]), start_of(&users[3]));
    assert!(
        older <= younger + chrono::Duration::milliseconds(250),
        "{} waited while {} started: {starts:?}",
        users[2],
        users[3]
    );

    // null resets to the configuration.
    let body = json!({ "concurrent_spawn_limit": null, "active_server_limit": null }).to_string();
    let (status, limits) = env
        .call(Method::PATCH, "/api/v1/admin/limits", Some(&body))
        .await;
    assert_eq!(status, StatusCode::OK, "{limits}");
    assert_eq!(limits["concurrent_spawn_limit"], 10);
    assert_eq!(limits["active_server_limit"], 50);
    let (status, _) = env
        .call(
            Method::POST,
            &format!("/api/v1/users/{}/server", users[4]),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    for bad in [
        json!({ "concurrent_spawn_limit": 0 }),
        json!({ "active_server_limit": "many" }),
        json!({}),
    ] {
        let (status, body) = env
            .call(
                Method::PATCH,
                "/api/v1/admin/limits",
                Some(&bad.to_string()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let user_token = env
        .register(&env.user("plain"), "a long enough password")
        .await;
    let (status, _) = env
        .call_with(Method::GET, "/api/v1/admin/limits", None, Some(&user_token))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

fn docker(args: &[&str]) {
    let status = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker");
    assert!(
        status.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&status.stderr)
    );
}

async fn after_every_process_is_killed_and_restarted_reconciliation_makes_the_state_right(
    backend: Backend,
) {
    let mut env = TestEnv::on(backend).await;
    let worker_flags = ["--reconcile-interval", "1"];
    let mut processes = vec![env.start_api_process().await];
    processes.push(env.start_worker_process(&worker_flags));
    processes.push(env.start_worker_process(&worker_flags));

    let users: Vec<String> = ["gone", "died", "unwanted", "fine"]
        .iter()
        .map(|n| env.user(n))
        .collect();
    for u in &users {
        env.create_user(u).await;
        let (status, body) = env
            .call(Method::POST, &format!("/api/v1/users/{u}/server"), None)
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    for u in &users {
        env.wait_server(
            &format!("/api/v1/users/{u}/server"),
            Duration::from_secs(30),
            |s| s["state"] == "running",
        )
        .await;
    }

    // Every Berth process dies at once.
    for index in processes {
        env.kill_worker(index);
    }
    // Meanwhile the world changes: a container vanishes, one dies, one is no longer
    // wanted, and a stray one with our labels appears.
    docker(&["rm", "-f", &env.container(&users[0])]);
    docker(&["kill", &env.container(&users[1])]);
    sqlx::query("update servers set state = 'stopped' from users u where u.id = servers.user_id and u.name = $1")
        .bind(&users[2])
        .execute(env.pool())
        .await
        .unwrap();
    let stray = format!("berth-stray-{}", env.id);
    let instance = format!("berth.instance={}", env.id);
    docker(&[
        "run",
        "-d",
        "--name",
        &stray,
        "--label",
        "berth.managed=true",
        "--label",
        &instance,
        "--label",
        "berth.server-id=999999",
        common::TEST_IMAGE,
    ]);
    assert_eq!(env.containers().len(), 4);

    env.start_api_process().await;
    env.start_worker_process(&worker_flags);
    env.start_worker_process(&worker_flags);

    let gone = env
        .wait_server(
            &format!("/api/v1/users/{}/server", users[0]),
            Duration::from_secs(20),
            |s| s["state"] == "failed",
        )
        .await;
    assert_eq!(gone["error"], "the container vanished", "{gone}");
    let died = env
        .wait_server(
            &format!("/api/v1/users/{}/server", users[1]),
            Duration::from_secs(20),
            |s| s["state"] == "failed",
        )
        .await;
    assert!(
        died["error"]
            .as_str()
            .unwrap()
            .contains("exited with code 137"),
        "{died}"
    );
    wait_for(
        "stray and unwanted containers to go",
        Duration::from_secs(20),
        async || env.containers() == vec![env.container(&users[3])],
    )
    .await;
    let fine = env
        .call(
            Method::GET,
            &format!("/api/v1/users/{}/server", users[3]),
            None,
        )
        .await
        .1;
    assert_eq!(fine["state"], "running");
    assert!(
        reqwest::get(fine["internal_url"].as_str().unwrap())
            .await
            .is_ok(),
        "the untouched server still answers"
    );

    // And the platform carries on: the lost server starts again.
    let (status, _) = env
        .call(
            Method::POST,
            &format!("/api/v1/users/{}/server", users[0]),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    env.wait_server(
        &format!("/api/v1/users/{}/server", users[0]),
        Duration::from_secs(30),
        |s| s["state"] == "running",
    )
    .await;
}

async fn a_worker_rides_out_a_lost_database_connection(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    let proxy = common::DbProxy::start(common::database_address()).await;
    let url = env.db_url.replace(&common::database_address(), &proxy.addr);
    let worker_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(48)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&url)
        .await
        .unwrap();
    env.start_worker_on(
        worker_pool,
        &["--heartbeat", "1", "--poll-interval-ms", "100"],
    );
    let first = env.user("before");
    let second = env.user("during");
    env.create_user(&first).await;
    env.create_user(&second).await;
    let path = |u: &str| format!("/api/v1/users/{u}/server");
    env.call(Method::POST, &path(&first), None).await;
    env.wait_server(&path(&first), Duration::from_secs(30), |s| {
        s["state"] == "running"
    })
    .await;

    // The worker loses the database; a spawn is requested meanwhile.
    proxy.cut();
    let (status, _) = env.call(Method::POST, &path(&second), None).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "the API has its own connections"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, waiting) = env.call(Method::GET, &path(&second), None).await;
    assert_eq!(waiting["state"], "pending_spawn");

    proxy.restore();
    env.wait_server(&path(&second), Duration::from_secs(30), |s| {
        s["state"] == "running"
    })
    .await;
    assert_eq!(env.containers().len(), 2);
}

async fn spawns_waiting_for_slots_end_as_asked_after_the_database_restarts(backend: Backend) {
    let postgres = common::OwnPostgres::start().await;
    let mut nats = match backend {
        Backend::Nats => Some(common::OwnNats::start().await),
        _ => None,
    };
    let mut env = TestEnv::on_own(backend, &postgres, nats.as_ref()).await;
    let body = json!({ "concurrent_spawn_limit": 2 }).to_string();
    let (status, limits) = env
        .call(Method::PATCH, "/api/v1/admin/limits", Some(&body))
        .await;
    assert_eq!(status, StatusCode::OK, "{limits}");
    for _ in 0..2 {
        env.start_worker_process(&[
            "--heartbeat",
            "1",
            "--poll-interval-ms",
            "100",
            "--server-env",
            "BERTH_TEST_START_DELAY=4",
        ]);
    }
    let users: Vec<String> = (0..10).map(|i| env.user(&format!("r{i}"))).collect();
    for u in &users {
        env.create_user(u).await;
    }
    let path = |u: &str| format!("/api/v1/users/{u}/server");
    for u in &users {
        let (status, body) = env.call(Method::POST, &path(u), None).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }

    // Two spawns run, eight wait for a slot: the database (and the broker) restart.
    tokio::time::sleep(Duration::from_secs(2)).await;
    postgres.restart();
    if let Some(nats) = nats.as_mut() {
        nats.restart().await;
    }

    // The last request for the first three is a stop, made once the API answers.
    let (stopped, running) = users.split_at(3);
    for u in stopped {
        wait_for(
            "the API to answer again",
            Duration::from_secs(30),
            async || {
                let (status, _) = env.call(Method::DELETE, &path(u), None).await;
                status == StatusCode::ACCEPTED
            },
        )
        .await;
    }
    for u in running {
        env.wait_server(&path(u), Duration::from_secs(80), |s| {
            s["state"] == "running"
        })
        .await;
    }
    for u in stopped {
        env.wait_server(&path(u), Duration::from_secs(60), |s| {
            s["state"] == "stopped"
        })
        .await;
    }
    wait_for(
        "one container per running server",
        Duration::from_secs(30),
        async || env.containers().len() == running.len(),
    )
    .await;
    let (_, limits) = env.call(Method::GET, "/api/v1/admin/limits", None).await;
    assert_eq!(limits["usage"]["waiting_spawns"], 0, "{limits}");
    // Jobs dropped with a failed consumer are not counted as in flight for ever.
    wait_for(
        "both workers to report no job in flight",
        Duration::from_secs(10),
        async || {
            let (_, workers) = env.call(Method::GET, "/api/v1/admin/workers", None).await;
            let workers = workers["workers"].as_array().cloned().unwrap_or_default();
            workers.len() == 2 && workers.iter().all(|w| w["jobs_in_flight"] == 0)
        },
    )
    .await;
}

on_every_store!(admins_change_limits_at_runtime_and_spawns_over_them_wait);

// Several processes share the store in these: Postgres only.
on_both_backends!(
    a_storm_of_200_spawns_on_3_workers_holds_both_limits,
    a_worker_killed_mid_spawn_is_taken_over_and_the_spawn_completes_once,
    sigterm_lets_the_spawn_in_flight_finish_and_exits_0,
    after_every_process_is_killed_and_restarted_reconciliation_makes_the_state_right,
    a_worker_rides_out_a_lost_database_connection,
    spawns_waiting_for_slots_end_as_asked_after_the_database_restarts,
);
