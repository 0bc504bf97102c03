//! The scheduler: culling idle and old servers, activity reports, ticks enqueued
//! once across replicas, missed ticks made up once, session expiry and archiving.
//! Schedules here tick every second and timeouts are seconds long.

mod common;

use std::{io::Read, time::Duration};

use common::{Backend, TestEnv, wait_for};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Flags of a scheduler that only culls, every second.
const CULL_EVERY_SECOND: [&str; 6] = [
    "--cull-schedule",
    "* * * * * *",
    "--session-expiry-schedule",
    "off",
    "--archive-schedule",
    "off",
];

fn now_iso(offset_secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(offset_secs)).to_rfc3339()
}

async fn report_activity(env: &TestEnv, user: &str) -> (StatusCode, Value) {
    let body =
        json!({ "last_activity": now_iso(0), "servers": { "": { "last_activity": now_iso(0) } } });
    env.call(
        Method::POST,
        &format!("/api/v1/users/{user}/activity"),
        Some(&body.to_string()),
    )
    .await
}

async fn idle_servers_are_culled_and_active_and_pending_ones_kept(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    // Phase 1: two servers start quickly.
    let fast = env.start_worker_process(&[]);
    let (idle, active, pending) = (env.user("idle"), env.user("active"), env.user("pending"));
    for user in [&idle, &active] {
        env.create_user(user).await;
        let path = format!("/api/v1/users/{user}/server");
        let (status, body) = env.call(Method::POST, &path, None).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        env.wait_server(&path, Duration::from_secs(30), |s| s["state"] == "running")
            .await;
    }
    let status = env.terminate_worker(fast, Duration::from_secs(20)).await;
    assert!(status.success());
    // Phase 2: a spawn that stays pending (its server takes 15 s to answer).
    env.start_worker_process(&["--server-env", "BERTH_TEST_START_DELAY=15"]);
    env.create_user(&pending).await;
    let pending_path = format!("/api/v1/users/{pending}/server");
    let (status, _) = env.call(Method::POST, &pending_path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    env.start_scheduler(&[&CULL_EVERY_SECOND[..], &["--idle-timeout", "3"]].concat());
    // The active user's server reports activity every half second.
    let idle_path = format!("/api/v1/users/{idle}/server");
    let active_path = format!("/api/v1/users/{active}/server");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = report_activity(&env, &active).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        let (_, server) = env.call(Method::GET, &idle_path, None).await;
        if server["state"] == "stopped" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle server was never culled: {server}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A few more culls pass; the active and the pending server stay.
    for _ in 0..6 {
        report_activity(&env, &active).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (_, server) = env.call(Method::GET, &active_path, None).await;
    assert_eq!(server["state"], "running", "{server}");
    // Still spawning (or just running, on a slow machine): never culled.
    let (_, server) = env.call(Method::GET, &pending_path, None).await;
    assert!(
        server["state"] == "pending_spawn" || server["state"] == "running",
        "{server}"
    );
    let stops: Vec<(String,)> = sqlx::query_as("select user_name from jobs where kind = 'stop'")
        .fetch_all(env.pool())
        .await
        .unwrap();
    assert_eq!(
        stops,
        vec![(idle.clone(),)],
        "only the idle server was stopped"
    );
    let (_, schedules) = env.call(Method::GET, "/api/v1/admin/schedules", None).await;
    let cull = &schedules["schedules"][0];
    assert_eq!(cull["name"], "cull", "{schedules}");
    assert_eq!(cull["expression"], "* * * * * *");
    assert!(
        cull["next_run_at"].is_string() && cull["last_run_at"].is_string(),
        "{cull}"
    );
}

async fn max_age_stops_an_active_server_after_its_warning(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    env.start_worker(&[]);
    let user = env.user("olga");
    env.create_user(&user).await;
    let path = format!("/api/v1/users/{user}/server");
    env.call(Method::POST, &path, None).await;
    let started = env
        .wait_server(&path, Duration::from_secs(30), |s| s["state"] == "running")
        .await;
    assert!(started["warning"].is_null());
    env.start_scheduler(
        &[
            &CULL_EVERY_SECOND[..],
            &[
                "--idle-timeout",
                "3600",
                "--max-age",
                "6",
                "--max-age-warning",
                "3",
            ],
        ]
        .concat(),
    );
    let mut warned_at = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
    let last = loop {
        report_activity(&env, &user).await;
        let (_, server) = env.call(Method::GET, &path, None).await;
        if warned_at.is_none() && server["warning"].is_string() {
            warned_at = Some(tokio::time::Instant::now());
            let warning = server["warning"].as_str().unwrap();
            assert!(warning.contains("maximum age"), "{warning}");
            assert_eq!(
                server["state"], "running",
                "warned first, still running: {server}"
            );
        }
        if server["state"] == "stopped" {
            break server;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never stopped: {server}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let warned_at = warned_at.expect("the user saw a warning before the stop");
    assert!(
        warned_at.elapsed() >= Duration::from_secs(2),
        "stopped {:?} after the warning, not after the warning time: {last}",
        warned_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_scheduler_replicas_enqueue_each_tick_exactly_once() {
    let mut env = TestEnv::start().await;
    let flags = [
        "--cull-schedule",
        "* * * * * *",
        "--session-expiry-schedule",
        "* * * * * *",
        "--archive-schedule",
        "off",
        "--tick-ms",
        "20",
    ];
    let (a, b) = (env.start_scheduler(&flags), env.start_scheduler(&flags));
    tokio::time::sleep(Duration::from_secs(6)).await;
    a.cancel();
    b.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for schedule in ["cull", "session_expiry"] {
        let (runs, ticks, first, last): (i64, i64, f64, f64) = sqlx::query_as(
            "select count(*), count(distinct tick), extract(epoch from min(tick))::float8, \
             extract(epoch from max(tick))::float8 from schedule_runs where schedule = $1",
        )
        .bind(schedule)
        .fetch_one(env.pool())
        .await
        .unwrap();
        assert!(runs >= 4, "{schedule}: {runs} runs in 6 s");
        assert_eq!(runs, ticks, "{schedule}: a tick enqueued twice");
        assert_eq!(
            (last - first) as i64 + 1,
            runs,
            "{schedule}: every second once, none skipped"
        );
    }
    let (jobs, runs): (i64, i64) = sqlx::query_as(
        "select (select count(*) from jobs where kind in ('cull', 'expire_sessions')), \
                (select count(*) from schedule_runs)",
    )
    .fetch_one(env.pool())
    .await
    .unwrap();
    assert_eq!(jobs, runs, "one job per tick");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ticks_missed_while_down_run_once_on_start_up() {
    let mut env = TestEnv::start().await;
    // A daily schedule whose scheduler last ran it four days ago.
    sqlx::query(
        "insert into schedules (name, expression, kind, registered_at) \
         values ('session_expiry', '0 0 2 * * *', 'expire_sessions', now() - interval '30 days')",
    )
    .execute(env.pool())
    .await
    .unwrap();
    sqlx::query(
        "insert into schedule_runs (schedule, tick, job_id) \
         values ('session_expiry', date_trunc('day', now()) - interval '4 days' + interval '2 hours', gen_random_uuid())",
    )
    .execute(env.pool())
    .await
    .unwrap();
    env.start_scheduler(&[
        "--cull-schedule",
        "off",
        "--session-expiry-schedule",
        "0 0 2 * * *",
        "--archive-schedule",
        "off",
        "--tick-ms",
        "20",
    ]);
    wait_for("the make-up run", Duration::from_secs(10), async || {
        env.count("select count(*) from schedule_runs").await == 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.count("select count(*) from schedule_runs").await,
        2,
        "made up once, not once per missed day"
    );
    assert_eq!(
        env.count("select count(*) from jobs where kind = 'expire_sessions'")
            .await,
        1
    );
    let latest_is_due: bool = sqlx::query_scalar(
        "select max(tick) <= now() and max(tick) > now() - interval '1 day' from schedule_runs",
    )
    .fetch_one(env.pool())
    .await
    .unwrap();
    assert!(latest_is_due, "the run is for the latest missed tick");
}

/// Every line of every archive file of `table` under `dir`.
fn archived_lines(dir: &std::path::Path, table: &str) -> Vec<Value> {
    let mut lines = Vec::new();
    let Ok(files) = std::fs::read_dir(dir.join(table)) else {
        return lines;
    };
    for file in files {
        let bytes = std::fs::read(file.unwrap().path()).unwrap();
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .unwrap();
        lines.extend(
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()),
        );
    }
    lines
}

fn snapshot(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for table in ["jobs", "audit_log", "activity_log"] {
        if let Ok(entries) = std::fs::read_dir(dir.join(table)) {
            for entry in entries {
                let path = entry.unwrap().path();
                files.push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archiving_moves_old_rows_to_files_once_and_expiry_removes_dead_sessions() {
    let mut env = TestEnv::start().await;
    let dir = std::env::temp_dir().join(format!("berth-archive-{}", env.id));
    let dir_flag = dir.display().to_string();
    env.start_worker(&[]);
    env.start_scheduler(&[
        "--cull-schedule",
        "off",
        "--session-expiry-schedule",
        "0 0 3 * * *",
        "--archive-schedule",
        "0 0 2 * * *",
        "--archive-after-days",
        "90",
        "--archive-dir",
        &dir_flag,
    ]);
    // Old rows over three days (more than one batch of jobs), and recent ones.
    sqlx::query(
        "insert into jobs (id, kind, state, user_name, created_at, finished_at) \
         select gen_random_uuid(), 'stop', 'succeeded', 'old-user', \
           now() - interval '100 days' - (i % 3) * interval '1 day', \
           now() - interval '100 days' - (i % 3) * interval '1 day' \
         from generate_series(1, 2500) i",
    )
    .execute(env.pool())
    .await
    .unwrap();
    sqlx::query(
        "insert into jobs (id, kind, state, user_name, finished_at) \
         select gen_random_uuid(), 'stop', 'succeeded', 'new-user', now() from generate_series(1, 10)",
    )
    .execute(env.pool())
    .await
    .unwrap();
    sqlx::query(
        "insert into audit_log (at, action) select now() - interval '120 days', 'old_event' \
         from generate_series(1, 50)",
    )
    .execute(env.pool())
    .await
    .unwrap();
    sqlx::query(
        "insert into activity_log (user_name, at, recorded_at) \
         select 'old-user', now() - interval '95 days', now() - interval '95 days' from generate_series(1, 30)",
    )
    .execute(env.pool())
    .await
    .unwrap();
    let before_audit = env.count("select count(*) from audit_log").await;
    wait_for(
        "the schedules to be registered",
        Duration::from_secs(10),
        async || env.count("select count(*) from schedules").await == 2,
    )
    .await;

    let run = async |name: &str| {
        let (status, body) = env
            .call(
                Method::POST,
                &format!("/api/v1/admin/schedules/{name}/run"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let job = env
            .wait_job(body["job_id"].as_str().unwrap(), Duration::from_secs(60))
            .await;
        assert_eq!(job["state"], "succeeded", "{job}");
        job["result"].clone()
    };
    let result = run("archive").await;
    assert_eq!(result["jobs"], 2500, "{result}");
    assert_eq!(result["audit_log"], 50, "{result}");
    assert_eq!(result["activity_log"], 30, "{result}");
    assert_eq!(archived_lines(&dir, "jobs").len(), 2500);
    assert_eq!(archived_lines(&dir, "audit_log").len(), 50);
    assert_eq!(archived_lines(&dir, "activity_log").len(), 30);
    assert!(
        archived_lines(&dir, "jobs")
            .iter()
            .all(|j| j["user_name"] == "old-user")
    );
    assert_eq!(
        std::fs::read_dir(dir.join("jobs")).unwrap().count(),
        3,
        "one file per day"
    );
    assert_eq!(
        env.count("select count(*) from jobs where user_name = 'old-user'")
            .await,
        0
    );
    assert_eq!(
        env.count("select count(*) from jobs where user_name = 'new-user'")
            .await,
        10
    );
    assert_eq!(
        env.count("select count(*) from audit_log where action = 'old_event'")
            .await,
        0
    );
    assert_eq!(
        env.count("select count(*) from audit_log where action <> 'old_event'")
            .await,
        before_audit - 50 + 1,
        "recent events stay (and the run itself is audited)"
    );
    assert_eq!(env.count("select count(*) from activity_log").await, 0);

    // Again: nothing more to archive, files untouched.
    let files = snapshot(&dir);
    let again = run("archive").await;
    assert_eq!(
        (again["jobs"].as_i64(), again["audit_log"].as_i64()),
        (Some(0), Some(0)),
        "{again}"
    );
    assert_eq!(snapshot(&dir), files, "nothing archived twice");

    // Session expiry: an expired and a long-revoked session go, a live one stays.
    let admin_id: i64 = sqlx::query_scalar("select id from users order by id limit 1")
        .fetch_one(env.pool())
        .await
        .unwrap();
    for (expires, revoked) in [
        ("now() - interval '1 hour'", "null"),
        ("now() + interval '1 hour'", "now() - interval '2 days'"),
        ("now() + interval '1 hour'", "null"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "insert into sessions (jti, user_id, expires_at, revoked_at) values (gen_random_uuid(), {admin_id}, {expires}, {revoked})"
        )))
        .execute(env.pool())
        .await
        .unwrap();
    }
    let sessions_before = env.count("select count(*) from sessions").await;
    let expired = run("session_expiry").await;
    assert_eq!(expired["sessions"], 2, "{expired}");
    assert_eq!(
        env.count("select count(*) from sessions").await,
        sessions_before - 2
    );
    let _ = std::fs::remove_dir_all(&dir);
}

async fn activity_reports_only_move_forward_and_refuse_the_future(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    env.start_worker(&[]);
    let user = env.user("ava");
    env.create_user(&user).await;
    let path = format!("/api/v1/users/{user}/server");
    env.call(Method::POST, &path, None).await;
    env.wait_server(&path, Duration::from_secs(30), |s| s["state"] == "running")
        .await;
    let activity = format!("/api/v1/users/{user}/activity");
    let server_at = async || {
        let (_, server) = env.call(Method::GET, &path, None).await;
        chrono::DateTime::parse_from_rfc3339(server["last_activity"].as_str().unwrap()).unwrap()
    };

    let recent = now_iso(-1);
    let body = json!({ "last_activity": recent, "servers": { "": { "last_activity": recent } } });
    let (status, _) = env
        .call(Method::POST, &activity, Some(&body.to_string()))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let moved = server_at().await;
    // An older report changes nothing.
    let body = json!({ "servers": { "": { "last_activity": now_iso(-3600) } } });
    let (status, _) = env
        .call(Method::POST, &activity, Some(&body.to_string()))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(server_at().await, moved, "activity never moves back");

    let rows = env.count("select count(*) from activity_log").await;
    for (body, expect) in [
        (
            json!({ "last_activity": now_iso(3600) }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "servers": { "": { "last_activity": now_iso(3600) } } }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "servers": { "nope": { "last_activity": now_iso(0) } } }),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({ "servers": { "Not_DNS": { "last_activity": now_iso(0) } } }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "last_activity": "yesterday" }),
            StatusCode::BAD_REQUEST,
        ),
        (json!({}), StatusCode::BAD_REQUEST),
    ] {
        let (status, answer) = env
            .call(Method::POST, &activity, Some(&body.to_string()))
            .await;
        assert_eq!(status, expect, "{body} → {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    let (status, _) = env
        .call(
            Method::POST,
            "/api/v1/users/nobody-here/activity",
            Some(&json!({ "last_activity": now_iso(0) }).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        env.count("select count(*) from activity_log").await,
        rows,
        "refused reports write nothing"
    );

    // A browser tab's heartbeat marks the server active now.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _) = env
        .call(Method::POST, &format!("{path}/heartbeat"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(server_at().await > moved);
    // Another user may not report for this one.
    let token = env
        .register(&env.user("eve"), "a long enough password")
        .await;
    let (status, _) = env
        .call_with(
            Method::POST,
            &format!("{path}/heartbeat"),
            None,
            Some(&token),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

on_every_store!(max_age_stops_an_active_server_after_its_warning);

on_both_stores!(activity_reports_only_move_forward_and_refuse_the_future);

// Two worker processes: Postgres only (`berth up` culls on SQLite in tests/up.rs).
on_both_backends!(idle_servers_are_culled_and_active_and_pending_ones_kept);
