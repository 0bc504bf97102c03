//! Bad input gets a clear 4xx with `{error, message}` and writes nothing; bad
//! settings are refused at start, by name and reason.

mod common;

use std::time::Duration;

use common::{Backend, DbProxy, TOKEN, TestEnv};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;

fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"], code, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "a message explains the error: {body}");
}

async fn rows(env: &TestEnv) -> (i64, i64, i64, i64) {
    (
        env.count("select count(*) from users").await,
        env.count("select count(*) from servers").await,
        env.count("select count(*) from jobs").await,
        match env.backend {
            Backend::Sqlite => env.count("select count(*) from queue").await,
            _ => env.count("select count(*) from apalis.jobs").await,
        },
    )
}

async fn bad_names_bodies_and_tokens_get_clear_errors_and_write_nothing(backend: Backend) {
    let env = TestEnv::on(backend).await;
    let user = env.user("fay");
    env.create_user(&user).await;
    let before = rows(&env).await;

    for bad in [
        "Fay",
        "fay_1",
        "-fay",
        "fay-",
        "fa--y",
        "f%C3%A4y",
        "a.b",
        &"x".repeat(64),
    ] {
        let (status, body) = env
            .call(Method::POST, &format!("/api/v1/users/{bad}"), None)
            .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_name");
        let (status, body) = env
            .call(Method::POST, &format!("/api/v1/users/{bad}/server"), None)
            .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_name");
        let (status, body) = env
            .call(
                Method::POST,
                &format!("/api/v1/users/{user}/servers/{bad}"),
                None,
            )
            .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_name");
    }

    let spawn = format!("/api/v1/users/{user}/server");
    let (status, body) = env.call(Method::POST, &spawn, Some("{\"image\": ")).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
    assert!(
        body["message"].as_str().unwrap().contains("malformed JSON"),
        "{body}"
    );
    let (status, body) = env
        .call(Method::POST, &spawn, Some("{\"image\": 42}"))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
    let (status, body) = env
        .call(Method::POST, &spawn, Some("{\"imag\": \"x\"}"))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
    let (status, body) = env
        .call(
            Method::POST,
            &spawn,
            Some("{\"image\": \"evil/miner:latest\"}"),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
    assert!(
        body["message"].as_str().unwrap().contains("not allowed"),
        "{body}"
    );
    let (status, body) = env
        .call(Method::POST, &format!("/api/v1/users/{user}"), Some("[1,2"))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
    let big = format!("{{\"image\": \"{}\"}}", "a".repeat(100 * 1024));
    let (status, body) = env.call(Method::POST, &spawn, Some(&big)).await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );

    // A body must be an object: `[]` once made a user.
    let listed = env.user("listed");
    for body in ["[]", "[\"x@example.org\"]", "42", "\"text\""] {
        let (status, answer) = env
            .call(Method::POST, &format!("/api/v1/users/{listed}"), Some(body))
            .await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, "bad_request");
    }

    // Every error is JSON, 405 where the method is wrong, and a path that is
    // not UTF-8 is a 400 like any other bad input.
    let (status, answer) = env.call(Method::PUT, "/api/v1/users", None).await;
    assert_error(
        status,
        &answer,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    let (status, answer) = env
        .call(Method::PATCH, &format!("/api/v1/users/{user}/server"), None)
        .await;
    assert_error(
        status,
        &answer,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    let (status, answer) = env.call(Method::GET, "/api/v1/users/%FF%FE", None).await;
    assert_error(status, &answer, StatusCode::BAD_REQUEST, "bad_request");

    // Unknown users and servers.
    let ghost = env.user("ghost");
    let (status, body) = env
        .call(Method::POST, &format!("/api/v1/users/{ghost}/server"), None)
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = env
        .call(Method::GET, &format!("/api/v1/users/{ghost}"), None)
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("\"{ghost}\"")) && !message.contains("UserName("),
        "a message names the user as text, not a Rust value: {message}"
    );
    let (_, body) = env
        .call(
            Method::GET,
            &format!("/api/v1/users/{user}/servers/nope/progress"),
            None,
        )
        .await;
    let message = body["message"].as_str().unwrap_or_default();
    assert!(!message.contains("Name("), "{body}");
    let (status, body) = env
        .call(Method::DELETE, &format!("/api/v1/users/{ghost}"), None)
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = env
        .call(
            Method::DELETE,
            &format!("/api/v1/users/{user}/servers/nope"),
            None,
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = env
        .call(Method::GET, &format!("/api/v1/users/{user}/server"), None)
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = env.call(Method::GET, "/api/v1/jobs/not-a-uuid", None).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
    let (status, body) = env
        .call(
            Method::GET,
            &format!("/api/v1/jobs/{}", uuid::Uuid::new_v4()),
            None,
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    // Missing or wrong tokens.
    for token in [None, Some("wrong-token-wrong-token"), Some("")] {
        let (status, body) = env.call_with(Method::POST, &spawn, None, token).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
        let (status, body) = env
            .call_with(Method::GET, "/api/v1/users", None, token)
            .await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let almost = format!("{TOKEN}x");
    let (status, body) = env
        .call_with(
            Method::DELETE,
            &format!("/api/v1/users/{user}"),
            None,
            Some(&almost),
        )
        .await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");

    // A taken name is a conflict.
    let (status, body) = env
        .call(Method::POST, &format!("/api/v1/users/{user}"), None)
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "conflict");

    assert_eq!(
        rows(&env).await,
        before,
        "nothing was written by any bad request"
    );
    // The default image is always allowed, listed or not.
    let (status, body) = env
        .call(
            Method::POST,
            &spawn,
            Some(&format!("{{\"image\": \"{}\"}}", schema::DEFAULT_IMAGE)),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["image"], schema::DEFAULT_IMAGE, "{body}");
    let (status, users) = env.call(Method::GET, "/api/v1/users", None).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    let mut expected = vec![common::ADMIN_USER, user.as_str()];
    expected.sort();
    assert_eq!(names, expected, "{users}");
}

async fn health_ready_and_unknown_routes(backend: Backend) {
    let env = TestEnv::on(backend).await;
    let (status, health) = env.call_with(Method::GET, "/health", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");
    assert!(
        health["version"].is_string()
            && health["uptime"].is_u64()
            && health["timestamp"].is_string(),
        "{health}"
    );

    let (status, ready) = env.call_with(Method::GET, "/ready", None, None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");

    let (status, body) = env.call(Method::GET, "/api/v1/nothing-here", None).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn ready_answers_503_while_the_database_is_unreachable() {
    let env = TestEnv::start().await;
    // A second API whose database connections run through a relay we can cut.
    let proxy = DbProxy::start(common::database_address()).await;
    let url = env.db_url.replace(&common::database_address(), &proxy.addr);
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect(&url)
        .await
        .unwrap();
    let (base, _api) = common::serve_api(
        &common::Db::Postgres(pool),
        &schema::QueueSettings::Postgres,
        &common::new_signing_key(),
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    let ready = client.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    proxy.cut();
    let answer = client.get(format!("{base}/ready")).send().await.unwrap();
    let status = answer.status();
    let body: Value = answer.json().await.unwrap();
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
    );
    let health = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(
        health.status(),
        StatusCode::OK,
        "liveness does not depend on the database"
    );
}

on_both_stores!(
    bad_names_bodies_and_tokens_get_clear_errors_and_write_nothing,
    health_ready_and_unknown_routes,
    slow_and_idle_connections_are_closed_and_the_api_stays_responsive,
);

/// Reads until the server closes the connection; how long that took.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

async fn slow_and_idle_connections_are_closed_and_the_api_stays_responsive(backend: Backend) {
    use tokio::io::AsyncWriteExt;
    let env = TestEnv::on_with(
        backend,
        &["--header-timeout", "1", "--max-connections", "40"],
    )
    .await;
    let address = env.base.trim_start_matches("http://").to_owned();
    // A hundred clients that never finish their headers: more than the listener
    // serves at once.
    let mut slow = vec![];
    for _ in 0..100 {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: berth\r\n")
            .await
            .unwrap();
        slow.push(stream);
    }
    // The API still answers: the slow ones are closed, and their places freed.
    let (status, health) = env.call(Method::GET, "/health", None).await;
    assert_eq!(status, StatusCode::OK, "{health}");
    for stream in &mut slow {
        assert!(
            closed_within(stream, Duration::from_secs(30)).await,
            "a connection that never finished its headers is closed"
        );
    }
    // A kept-alive connection left idle is closed too.
    let mut idle = tokio::net::TcpStream::connect(&address).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: berth\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut idle, Duration::from_secs(30)).await,
        "an idle kept-alive connection is closed"
    );
}

/// What `berth <args>` printed and how it ended, with only `settings` in its
/// environment (and no database unless one is given).
fn start_with(args: &[&str], settings: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_berth"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_BACKTRACE", "0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (key, value) in settings {
        command.env(key, value);
    }
    let mut child = command.spawn().unwrap();
    // A refusal comes at once; a process still running after this is the defect
    // (it used to start and fail a minute later, or wait out a pool's timeout).
    let deadline = std::time::Instant::now() + Duration::from_secs(9);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("berth {args:?} with {settings:?} was still starting after 9 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut text = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    (status, text)
}

#[test]
fn nonsense_settings_are_refused_at_start_by_name_and_reason() {
    let free_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("postgres://berth:secret@127.0.0.1:{free_port}/berth");
    // (command, settings, what the refusal says)
    type Case<'a> = (&'a [&'a str], Vec<(&'a str, &'a str)>, &'a [&'a str]);
    let cases: [Case; 8] = [
        (
            &["scheduler"],
            vec![("BERTH_CULL_SCHEDULE", "*/5 * *")],
            &[
                "BERTH_CULL_SCHEDULE",
                "has 3 fields",
                "sec min hour day month weekday",
            ],
        ),
        (
            &["scheduler"],
            vec![("BERTH_ARCHIVE_SCHEDULE", "0 61 * * * *")],
            &["BERTH_ARCHIVE_SCHEDULE", "Minutes must be less than"],
        ),
        (
            &["scheduler"],
            vec![("BERTH_IDLE_TIMEOUT", "-5")],
            &["BERTH_IDLE_TIMEOUT must be at least 1, not -5"],
        ),
        (
            &["scheduler"],
            vec![("BERTH_MAX_AGE", "-1")],
            &["BERTH_MAX_AGE must be at least 0, not -1"],
        ),
        (
            &["api"],
            vec![("BERTH_CONCURRENT_SPAWN_LIMIT", "0")],
            &["BERTH_CONCURRENT_SPAWN_LIMIT must be at least 1, not 0"],
        ),
        (
            &["worker"],
            vec![("BERTH_ACTIVE_SERVER_LIMIT", "many")],
            &["BERTH_ACTIVE_SERVER_LIMIT must be a whole number"],
        ),
        (
            &["api"],
            vec![("BERTH_DATABASE_URL", "sqlite:///var/lib/berth/berth.db")],
            &[
                "BERTH_DATABASE_URL is a SQLite URL",
                "`berth up` without BERTH_DATABASE_URL",
            ],
        ),
        (
            &["api"],
            vec![("BERTH_DATABASE_URL", dead.as_str())],
            &[
                "connecting to the database at 127.0.0.1:",
                "Connection refused",
            ],
        ),
    ];
    for (args, settings, expected) in cases {
        let (status, text) = start_with(args, &settings);
        assert!(!status.success(), "{args:?} {settings:?} started: {text}");
        for part in expected {
            assert!(
                text.contains(part),
                "{args:?} {settings:?}: {part:?} not in {text}"
            );
        }
        assert!(!text.contains("secret"), "the password was printed: {text}");
    }
}

/// Ctrl-C works at every moment of start-up: here while the database accepts the
/// connection and never answers (the start-up would wait 10 s for it).
#[test]
fn an_interrupt_ends_a_start_that_waits_for_the_database() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = vec![];
        for conn in silent.incoming().flatten() {
            held.push(conn);
        }
    });
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("api")
        .env(
            "BERTH_DATABASE_URL",
            format!("postgres://berth@127.0.0.1:{port}/berth"),
        )
        .env("BERTH_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(child.try_wait().unwrap().is_none(), "still starting");
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("berth api ignored the interrupt while waiting for its database");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130), "{status}");
    let mut text = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert!(text.contains("interrupted while starting"), "{text}");
}
