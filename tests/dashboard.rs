//! Spawn progress (SSE), metrics, an operator's retry and cancel, and the dashboard
//! in a real browser (Debian's chromium driven by chromedriver over WebDriver).

mod common;

use std::time::Duration;

use common::{
    ADMIN_PASSWORD, ADMIN_USER, Backend, MISSING_IMAGE, TestEnv,
    browser::{Driver, see},
    wait_for,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Reads a progress stream to its end: the events in order.
async fn progress_events(env: &TestEnv, path: &str) -> Vec<Value> {
    let response = env
        .http()
        .get(format!("{}{path}", env.base))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .expect("the stream answers");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut response = response;
    let (mut text, mut events) = (String::new(), vec![]);
    let read = async {
        while let Some(chunk) = response.chunk().await.expect("stream reads") {
            text.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = text.find("\n\n") {
                let frame: String = text.drain(..end + 2).collect();
                for line in frame.lines() {
                    if let Some(data) = line.strip_prefix("data:") {
                        events
                            .push(serde_json::from_str::<Value>(data.trim()).expect("JSON events"));
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the stream ends once the spawn has ended");
    events
}

async fn spawn_progress_streams_from_the_request_to_ready(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    // Over the spawn limit the first event says the spawn waits for a slot.
    env.start_worker(&["--server-env", "BERTH_TEST_START_DELAY=1"]);
    let user = env.user("prog");
    env.create_user(&user).await;
    // The spawn is requested on one API process and followed on another.
    let first_api = env.base.clone();
    env.start_api_process().await;
    let response = env
        .http()
        .post(format!("{first_api}/api/v1/users/{user}/server"))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let events = progress_events(&env, &format!("/api/v1/users/{user}/server/progress")).await;
    let last = events.last().expect("some events");
    assert_eq!(last["ready"], true, "{events:?}");
    assert_eq!(last["progress"], 100);
    let server = env
        .call(Method::GET, &format!("/api/v1/users/{user}/server"), None)
        .await
        .1;
    assert_eq!(last["url"], server["url"], "{events:?}");
    assert_eq!(events[0]["progress"], 0, "{events:?}");
    let progress: Vec<i64> = events
        .iter()
        .map(|e| e["progress"].as_i64().unwrap())
        .collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    let said = |what: &str| {
        events
            .iter()
            .any(|e| e["message"].as_str().unwrap().contains(what))
    };
    assert!(said("creating container"), "{events:?}");
    assert!(said("waiting for the server to answer"), "{events:?}");
    assert!(
        events.iter().all(|e| e.get("failed").is_none()),
        "{events:?}"
    );

    // A stream opened on a running server answers at once that it is ready.
    let again = progress_events(&env, &format!("/api/v1/users/{user}/server/progress")).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0]["ready"], true);

    // A spawn that fails ends its stream with failed and the reason.
    let named = format!("/api/v1/users/{user}/servers/broken");
    let body = json!({ "image": MISSING_IMAGE }).to_string();
    let (status, _) = env.call(Method::POST, &named, Some(&body)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let events = progress_events(&env, &format!("{named}/progress")).await;
    let last = events.last().unwrap();
    assert_eq!(last["failed"], true, "{events:?}");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("could not be pulled"),
        "{last}"
    );

    // Someone else's progress is not theirs to read.
    let bob = env.user("bob");
    let token = env.register(&bob, "a long enough password").await;
    let (status, body) = env
        .call_with(
            Method::GET,
            &format!("/api/v1/users/{user}/server/progress"),
            None,
            Some(&token),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

/// The value of one sample in Prometheus text, 0 when absent.
fn sample(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Prometheus's conventions: every family has HELP and TYPE, and the job
/// counters exist at 0 before anything happened (a rate needs the zero).
fn follows_conventions(text: &str) {
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(families.len() >= 5, "{text}");
    for family in families {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# HELP {family} "))),
            "{family} has no help text: {text}"
        );
    }
    for counter in ["failed", "cancelled", "succeeded"] {
        for kind in ["spawn", "stop", "cleanup"] {
            let series = format!("berth_jobs_{counter}_total{{kind=\"{kind}\"}} ");
            assert!(text.contains(&series), "no {series}at 0: {text}");
        }
    }
}

async fn metrics_text(env: &TestEnv) -> String {
    let response = env
        .http()
        .get(format!("{}/metrics", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.unwrap()
}

async fn metrics_counters_move_when_jobs_run(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    env.start_worker(&[]);
    let before = metrics_text(&env).await;
    follows_conventions(&before);
    assert_eq!(
        sample(&before, "berth_jobs_failed_total{kind=\"spawn\"}"),
        0.0
    );
    let user = env.user("met");
    env.create_user(&user).await;
    let path = format!("/api/v1/users/{user}/server");
    env.call(Method::POST, &path, None).await;
    env.wait_server(&path, Duration::from_secs(30), |s| s["state"] == "running")
        .await;
    let after = metrics_text(&env).await;
    let grew = |name: &str| sample(&after, name) - sample(&before, name);
    assert_eq!(
        grew("berth_jobs_enqueued_total{kind=\"spawn\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        grew("berth_jobs_started_total{kind=\"spawn\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        grew("berth_jobs_succeeded_total{kind=\"spawn\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, "berth_spawn_latency_seconds_count"),
        1.0,
        "{after}"
    );
    assert_eq!(sample(&after, "berth_active_servers"), 1.0, "{after}");
    assert_eq!(sample(&after, "berth_active_server_limit"), 50.0);
    assert_eq!(sample(&after, "berth_spawn_slot_limit"), 10.0);
    assert_eq!(sample(&after, "berth_workers_alive"), 1.0, "{after}");
    assert_eq!(
        sample(&after, "berth_queue_depth{queue=\"berth.spawn\"}"),
        0.0
    );
    assert!(
        after.contains("berth_http_request_duration_seconds_count{method=\"POST\",route=\"/api/v1/users/{user}/server\",status=\"202\"} 1"),
        "{after}"
    );

    env.call(Method::DELETE, &path, None).await;
    env.wait_server(&path, Duration::from_secs(30), |s| s["state"] == "stopped")
        .await;
    let stopped = metrics_text(&env).await;
    assert_eq!(
        sample(&stopped, "berth_jobs_succeeded_total{kind=\"stop\"}"),
        1.0,
        "{stopped}"
    );
    assert_eq!(sample(&stopped, "berth_active_servers"), 0.0);
}

async fn an_admin_cancels_a_waiting_spawn_and_retries_it(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    let user = env.user("cx");
    env.create_user(&user).await;
    let path = format!("/api/v1/users/{user}/server");
    // No worker yet: the spawn waits in the queue.
    let (_, pending) = env.call(Method::POST, &path, None).await;
    let job = pending["job_id"].as_str().unwrap().to_owned();
    let (status, retried) = env
        .call(Method::POST, &format!("/api/v1/jobs/{job}/retry"), None)
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a queued job is not retried: {retried}"
    );
    let (status, cancelled) = env
        .call(Method::POST, &format!("/api/v1/jobs/{job}/cancel"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["state"], "cancelled");
    let (_, server) = env.call(Method::GET, &path, None).await;
    assert_eq!(server["state"], "stopped", "{server}");
    let (_, limits) = env.call(Method::GET, "/api/v1/admin/limits", None).await;
    assert_eq!(
        limits["usage"]["active_servers"], 0,
        "the place was given back: {limits}"
    );
    let (status, again) = env
        .call(Method::POST, &format!("/api/v1/jobs/{job}/cancel"), None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");

    // A worker that starts now finds the cancelled job and leaves it be; the retry runs.
    env.start_worker(&[]);
    let (status, retry) = env
        .call(Method::POST, &format!("/api/v1/jobs/{job}/retry"), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{retry}");
    assert_eq!(retry["retry_of"], job.as_str());
    let done = env
        .wait_job(retry["id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let (_, old) = env
        .call(Method::GET, &format!("/api/v1/jobs/{job}"), None)
        .await;
    assert_eq!(old["state"], "cancelled", "{old}");
    assert_eq!(env.containers().len(), 1);

    // Only admins retry and cancel.
    let eve = env.user("eve");
    let token = env.register(&eve, "a long enough password").await;
    let (status, _) = env
        .call_with(
            Method::POST,
            &format!("/api/v1/jobs/{job}/retry"),
            None,
            Some(&token),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

on_every_store!(an_admin_cancels_a_waiting_spawn_and_retries_it);

/// Opens a progress stream as `token`; the answer, its body not yet read.
async fn open_progress(env: &TestEnv, path: &str, token: &str) -> reqwest::Response {
    env.http()
        .get(format!("{}{path}", env.base))
        .bearer_auth(token)
        .send()
        .await
        .expect("the stream answers")
}

/// Whether a stream ends (its body closes) within `within`.
async fn ends_within(response: &mut reqwest::Response, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        while let Ok(Some(_)) = response.chunk().await {}
    })
    .await
    .is_ok()
}

async fn progress_streams_are_capped_per_user_and_end_with_the_session(backend: Backend) {
    let env = TestEnv::on_with(backend, &["--progress-streams-per-user", "2"]).await;
    let (ann, bob) = (env.user("ann"), env.user("bob"));
    let ann_token = env.register(&ann, "a long enough password").await;
    let bob_token = env.register(&bob, "a long enough password").await;
    // No worker runs: the spawns wait, and their streams stay open.
    for (user, token) in [(&ann, &ann_token), (&bob, &bob_token)] {
        let (status, body) = env
            .call_with(
                Method::POST,
                &format!("/api/v1/users/{user}/server"),
                None,
                Some(token),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let ann_path = format!("/api/v1/users/{ann}/server/progress");
    let mut open = vec![];
    for _ in 0..2 {
        let response = open_progress(&env, &ann_path, &ann_token).await;
        assert_eq!(response.status(), StatusCode::OK);
        open.push(response);
    }
    let third = open_progress(&env, &ann_path, &ann_token).await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(third.headers().contains_key("retry-after"));
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["error"], "too_many_requests", "{body}");
    // The cap is Ann's alone.
    let mut bobs = open_progress(
        &env,
        &format!("/api/v1/users/{bob}/server/progress"),
        &bob_token,
    )
    .await;
    assert_eq!(bobs.status(), StatusCode::OK);

    // Ann logs out: her streams end, Bob's does not.
    let (status, body) = env
        .call_with(Method::POST, "/api/v1/auth/logout", None, Some(&ann_token))
        .await;
    assert!(status.is_success(), "{status}: {body}");
    for response in &mut open {
        assert!(
            ends_within(response, Duration::from_secs(20)).await,
            "a stream of a session that ended stays open"
        );
    }
    assert!(
        !ends_within(&mut bobs, Duration::from_secs(1)).await,
        "another user's stream goes on"
    );
    let after = open_progress(&env, &ann_path, &ann_token).await;
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED);

    // The ended streams gave their places back.
    let again = env.login(&ann, "a long enough password").await;
    for _ in 0..2 {
        let response = open_progress(&env, &ann_path, &again).await;
        assert_eq!(response.status(), StatusCode::OK, "places are given back");
        open.push(response);
    }
}

/// An admin adds a user from the dashboard's users page and deletes them again,
/// with the API's checks (a bad name is refused, nothing created) and audit.
async fn admins_add_and_delete_users_from_the_dashboard(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    env.start_worker(&[]);
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let admin = env.login(ADMIN_USER, ADMIN_PASSWORD).await;
    // A form posted from the dashboard's own page.
    let post = async |path: &str, form: &str| {
        let answer = client
            .post(format!("{}{path}", env.base))
            .header("cookie", format!("berth_session={admin}"))
            .header("origin", &env.base)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), StatusCode::SEE_OTHER, "{path} {form}");
        let to = answer.headers()["location"].to_str().unwrap().to_owned();
        // What the page it leads to says.
        client
            .get(format!("{}{to}", env.base))
            .header("cookie", format!("berth_session={admin}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let users_before = env.count("select count(*) from users").await;
    let refused = post(
        "/admin/users",
        "username=Not+A+Name&password=a+long+password",
    )
    .await;
    assert!(refused.contains("class=\"error\""), "{refused}");
    assert_eq!(env.count("select count(*) from users").await, users_before);

    let name = env.user("added");
    let added = post(
        "/admin/users",
        &format!("username={name}&email=&password=a+long+enough+password&role=user"),
    )
    .await;
    assert!(
        added.contains(&format!("{name} was added as user")),
        "{added}"
    );
    assert!(added.contains(&format!("data-user=\"{name}\"")), "{added}");
    let token = env.login(&name, "a long enough password").await;
    assert!(!token.is_empty());

    // Their page: a server started from it runs, with its job and their session.
    let starting = post(&format!("/admin/users/{name}/servers/start"), "server=lab").await;
    assert!(starting.contains("Starting"), "{starting}");
    env.wait_server(
        &format!("/api/v1/users/{name}/servers/lab"),
        Duration::from_secs(30),
        |s| s["state"] == "running",
    )
    .await;
    let page = client
        .get(format!("{}/admin/users/{name}", env.base))
        .header("cookie", format!("berth_session={admin}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let row = page
        .split(&format!("data-server=\"{name}/lab\""))
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .unwrap_or_else(|| panic!("no row of the server: {page}"));
    assert!(
        row.contains(">running<") && row.contains(">open<") && row.contains(">Stop<"),
        "{row}"
    );
    assert!(row.contains(&format!("/user/{name}/lab/")), "{row}");
    let jobs = page.split("id=\"user-jobs\"").nth(1).unwrap();
    assert!(jobs.contains(">spawn<") && jobs.contains(">lab<"), "{jobs}");
    let sessions = page.split("id=\"user-sessions\"").nth(1).unwrap();
    assert!(sessions.contains("127.0.0.1"), "{sessions}");

    let deleted = post(&format!("/admin/users/{name}/delete"), "").await;
    assert!(
        deleted.contains(&format!("{name} is being deleted")),
        "{deleted}"
    );
    wait_for("the user removed", Duration::from_secs(30), async || {
        env.call(Method::GET, &format!("/api/v1/users/{name}"), None)
            .await
            .0
            == StatusCode::NOT_FOUND
    })
    .await;
    let audited = env
        .count("select count(*) from audit_log where action in ('user_created', 'user_deleted') and actor like 'user:%'")
        .await;
    assert_eq!(audited, 2);
}

/// Asks for a server of an image that cannot be pulled: a spawn bound to fail.
async fn spawn_missing_image(env: &TestEnv, user: &str, server: &str) -> Value {
    let body = json!({ "image": MISSING_IMAGE }).to_string();
    let (status, pending) = env
        .call(
            Method::POST,
            &format!("/api/v1/users/{user}/servers/{server}"),
            Some(&body),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pending}");
    pending
}

/// The `<figure>` of one chart in a page.
fn figure<'a>(page: &'a str, key: &str) -> &'a str {
    let start = page
        .find(&format!("data-chart=\"{key}\""))
        .unwrap_or_else(|| panic!("a {key} chart in the page"));
    let end = start + page[start..].find("</figure>").expect("the figure ends");
    &page[start..end]
}

async fn the_overview_charts_what_the_platform_did(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    env.start_worker(&["--heartbeat", "1"]);
    let admin = env.login(ADMIN_USER, ADMIN_PASSWORD).await;
    let user = env.user("chart");
    env.create_user(&user).await;
    let (_, ok) = env
        .call(Method::POST, &format!("/api/v1/users/{user}/server"), None)
        .await;
    let bad = spawn_missing_image(&env, &user, "bad").await;
    for job in [&ok, &bad] {
        env.wait_job(job["job_id"].as_str().unwrap(), Duration::from_secs(30))
            .await;
    }
    // The workers sample the platform (here every heartbeat, once a minute).
    wait_for(
        "a sample of the platform",
        Duration::from_secs(15),
        async || env.count("select count(*) from platform_samples").await > 0,
    )
    .await;

    for (window, label) in [("hour", "−60 min"), ("day", "−24 h")] {
        let page = env
            .http()
            .get(format!("{}/admin?chart={window}", env.base))
            .header("cookie", format!("berth_session={admin}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            page.contains(&format!("data-window=\"{window}\"")),
            "{page}"
        );
        // One server active of its limit, none queued or spawning now.
        let active = figure(&page, "active_servers");
        assert!(active.contains("data-latest=\"1\""), "{active}");
        assert!(active.contains("limit 50"), "{active}");
        assert!(active.contains(label), "{active}");
        assert!(figure(&page, "queue_depth").contains("data-latest=\"0\""));
        assert!(figure(&page, "spawns_in_flight").contains("limit 10"));
        // The spawn that succeeded has a latency; the one that failed is one bar.
        let latency = figure(&page, "spawn_latency");
        assert!(latency.contains("data-latest=\"p50 "), "{latency}");
        assert!(
            latency.contains("<circle") || latency.contains("<polyline"),
            "{latency}"
        );
        let failures = figure(&page, "failures");
        assert!(failures.contains("data-latest=\"1 in all\""), "{failures}");
        assert_eq!(failures.matches("class=\"bar\"").count(), 1, "{failures}");
    }
}

on_both_stores!(
    the_overview_charts_what_the_platform_did,
    admins_add_and_delete_users_from_the_dashboard,
    progress_streams_are_capped_per_user_and_end_with_the_session,
    metrics_counters_move_when_jobs_run,
    the_dashboard_turns_away_strangers_non_admins_and_other_sites,
    bulk_actions_cancel_the_selected_then_all_matching_and_retry_them,
);

// Followed on a second API process: Postgres only.
on_both_backends!(spawn_progress_streams_from_the_request_to_ready);

async fn log_in(browser: &fantoccini::Client, base: &str, user: &str, password: &str) {
    use fantoccini::Locator;
    browser.goto(&format!("{base}/admin")).await.unwrap();
    browser
        .find(Locator::Id("username"))
        .await
        .unwrap()
        .send_keys(user)
        .await
        .unwrap();
    browser
        .find(Locator::Id("password"))
        .await
        .unwrap()
        .send_keys(password)
        .await
        .unwrap();
    browser
        .find(Locator::Id("login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admin_watches_a_spawn_go_live_and_retries_a_failed_job_in_a_browser() {
    use fantoccini::Locator;
    let mut env = TestEnv::start().await;
    env.start_worker(&[]);
    let driver = Driver::start().await;
    let browser = driver.browser().await;

    log_in(&browser, &env.base, ADMIN_USER, ADMIN_PASSWORD).await;
    see(&browser, "h1", "Overview").await;
    see(&browser, "[data-stat='workers_alive']", "1").await;
    let artefacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("artefacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let png = browser.screenshot().await.unwrap();
    std::fs::write(artefacts.join("dashboard-overview.png"), &png).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");

    // The servers page, then a spawn from elsewhere: it appears and turns running
    // without a reload (a marker set in the page survives).
    browser
        .goto(&format!("{}/admin/servers", env.base))
        .await
        .unwrap();
    see(&browser, "h1", "Servers").await;
    browser
        .execute("window.berthMarker = 42; return null;", vec![])
        .await
        .unwrap();
    let user = env.user("web");
    env.create_user(&user).await;
    env.call(Method::POST, &format!("/api/v1/users/{user}/server"), None)
        .await;
    let row = format!("tr[data-server='{user}/'] td.state");
    see(&browser, &row, "running").await;
    let marker = browser
        .execute("return window.berthMarker;", vec![])
        .await
        .unwrap();
    assert_eq!(marker, json!(42), "the page was not reloaded");

    // The overview's numbers follow live updates: a second spawn's success
    // shows without a reload (queue names have dots: "berth.spawn").
    browser.goto(&format!("{}/admin", env.base)).await.unwrap();
    let succeeded = "[data-stat='queues/berth.spawn/succeeded']";
    see(&browser, succeeded, "1").await;
    browser
        .execute("window.berthMarker = 43; return null;", vec![])
        .await
        .unwrap();
    env.call(
        Method::POST,
        &format!("/api/v1/users/{user}/servers/two"),
        None,
    )
    .await;
    see(&browser, succeeded, "2").await;
    see(&browser, "[data-stat='servers/running']", "2").await;
    let marker = browser
        .execute("return window.berthMarker;", vec![])
        .await
        .unwrap();
    assert_eq!(marker, json!(43), "the overview was not reloaded");
    let png = browser.screenshot().await.unwrap();
    std::fs::write(artefacts.join("dashboard-overview-live.png"), &png).unwrap();

    // The user's page: both servers running, with the jobs that started them.
    browser
        .goto(&format!("{}/admin/users/{user}", env.base))
        .await
        .unwrap();
    see(
        &browser,
        &format!("tr[data-server='{user}/two'] td.state"),
        "running",
    )
    .await;
    see(&browser, "#user-jobs", "spawn").await;
    let png = browser.screenshot().await.unwrap();
    std::fs::write(artefacts.join("dashboard-user.png"), &png).unwrap();

    // A failed spawn, retried from its page.
    let pending = spawn_missing_image(&env, &user, "bad").await;
    let job = pending["job_id"].as_str().unwrap().to_owned();
    let failed = env.wait_job(&job, Duration::from_secs(30)).await;
    assert_eq!(failed["state"], "failed");
    browser
        .goto(&format!("{}/admin/jobs?state=failed", env.base))
        .await
        .unwrap();
    // Whole ids: prefixes of time-ordered ids collide.
    see(&browser, "tbody[data-live]", &job).await;
    browser
        .goto(&format!("{}/admin/jobs/{job}", env.base))
        .await
        .unwrap();
    browser
        .find(Locator::Id("retry"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    see(&browser, ".notice", "Retried as job").await;
    let url = browser.current_url().await.unwrap();
    let retry = url.path().rsplit('/').next().unwrap().to_owned();
    assert_ne!(retry, job);
    let (_, retried) = env
        .call(Method::GET, &format!("/api/v1/jobs/{retry}"), None)
        .await;
    assert_eq!(retried["retry_of"], job.as_str(), "{retried}");
    assert_eq!(retried["kind"], "spawn");

    // The overview's charts, for a person to look at.
    browser.goto(&format!("{}/admin", env.base)).await.unwrap();
    see(&browser, "[data-chart='failures'] .latest", "in all").await;
    let charts = browser.find(Locator::Css("section.charts")).await.unwrap();
    let png = charts.screenshot().await.unwrap();
    std::fs::write(artefacts.join("dashboard-charts.png"), &png).unwrap();

    // Logging out ends the session: the dashboard asks for a login again.
    browser
        .find(Locator::Css("form.logout button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    see(&browser, "h1", "Berth operator dashboard").await;
    browser
        .goto(&format!("{}/admin/jobs", env.base))
        .await
        .unwrap();
    see(&browser, "h1", "Berth operator dashboard").await;

    // Someone who is not an admin logs in and is turned away.
    let plain = env.user("plain");
    env.register(&plain, "a long enough password").await;
    log_in(&browser, &env.base, &plain, "a long enough password").await;
    see(&browser, "h1", "Admins only").await;
    browser.close().await.unwrap();
}

async fn the_dashboard_turns_away_strangers_non_admins_and_other_sites(backend: Backend) {
    let env = TestEnv::on(backend).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = |path: &str, cookie: Option<&str>| {
        let mut request = client.get(format!("{}{path}", env.base));
        if let Some(c) = cookie {
            request = request.header("cookie", format!("berth_session={c}"));
        }
        request.send()
    };
    let anonymous = page("/admin/jobs", None).await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::SEE_OTHER);
    // Back to the page it wanted once logged in (it was the overview).
    assert_eq!(
        anonymous.headers()["location"],
        "/admin/login?next=%2Fadmin%2Fjobs"
    );
    let forged = page("/admin", Some("not-a-token")).await.unwrap();
    assert_eq!(forged.status(), StatusCode::SEE_OTHER);

    let user = env.user("nope");
    let token = env.register(&user, "a long enough password").await;
    let denied = page("/admin", Some(&token)).await.unwrap();
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    assert!(denied.text().await.unwrap().contains("Admins only"));

    let admin = env.login(ADMIN_USER, ADMIN_PASSWORD).await;
    let ok = page("/admin/jobs?state=failed", Some(&admin))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let csp = ok.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let bad_filter = page("/admin/jobs?state=exploded", Some(&admin))
        .await
        .unwrap();
    assert_eq!(bad_filter.status(), StatusCode::BAD_REQUEST);

    // An action posted from another site is refused even with the cookie.
    let cross = client
        .post(format!("{}/admin/servers/stop-idle", env.base))
        .header("cookie", format!("berth_session={admin}"))
        .header("origin", "http://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("minutes=1")
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), StatusCode::FORBIDDEN);
    // Nor from this host under another scheme (the check once ignored the scheme),
    // nor from a page whose name was rebound to this machine (its Host is its own).
    let host = env.base.trim_start_matches("http://").to_owned();
    for (origin, host_header) in [
        (format!("https://{host}"), host.clone()),
        (
            "http://rebound.example:80".to_owned(),
            "rebound.example:80".to_owned(),
        ),
    ] {
        let refused = client
            .post(format!("{}/admin/servers/stop-idle", env.base))
            .header("cookie", format!("berth_session={admin}"))
            .header("origin", &origin)
            .header("host", &host_header)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("minutes=1")
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{origin}");
    }
    let audit = env
        .count("select count(*) from audit_log where action = 'idle_servers_stopped'")
        .await;
    assert_eq!(audit, 0);
    // A Berth on the loopback answers nothing under a foreign name: DNS rebinding
    // would let any web page read the API and the dashboard with the user's cookie.
    for path in ["/admin", "/api/v1/users", "/health"] {
        let rebound = client
            .get(format!("{}{path}", env.base))
            .header("host", "rebound.example")
            .header("cookie", format!("berth_session={admin}"))
            .bearer_auth(common::TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(rebound.status(), StatusCode::FORBIDDEN, "{path}");
        let body: Value = rebound.json().await.unwrap();
        assert_eq!(body["error"], "forbidden", "{body}");
    }
    for name in ["localhost", "127.0.0.1", "[::1]"] {
        let port = host.rsplit_once(':').unwrap().1;
        let ok = client
            .get(format!("{}/health", env.base))
            .header("host", format!("{name}:{port}"))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), StatusCode::OK, "{name}");
    }

    // A link cannot make the dashboard say something: only what an action sealed.
    let lure = "Your session expired: log in again at evil.example";
    let encoded = format!("error={}", lure.replace(' ', "%20").replace(':', "%3A"));
    for path in [
        format!("/admin/servers?{encoded}"),
        format!("/admin/servers?{encoded}&seal=00000000000000000000000000000000"),
        format!("/admin/login?{encoded}"),
    ] {
        let shown = page(&path, Some(&admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!shown.contains("evil.example"), "{path}: {shown}");
    }
    let acted = client
        .post(format!("{}/admin/servers/stop-idle", env.base))
        .header("cookie", format!("berth_session={admin}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("minutes=60")
        .send()
        .await
        .unwrap();
    let location = acted.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.contains("seal="), "{location}");
    let shown = page(&location, Some(&admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        shown.contains("role=\"status\""),
        "the action's own notice is shown: {shown}"
    );
    // A login form with wrong credentials says so and sets no cookie.
    let wrong = client
        .post(format!("{}/admin/login", env.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "username={ADMIN_USER}&password=wrong&next=%2Fadmin"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.headers().get("set-cookie").is_none());
    // A `next` with control characters or spaces is not followed (it was a 500):
    // the login lands on the dashboard, and the form shown again is well formed.
    for next in [
        "%2Fadmin%0D%0ASet-Cookie%3A%20x%3Dy",
        "%2Fadmin%00",
        "%2Fadmin%20x",
    ] {
        let response = client
            .post(format!("{}/admin/login", env.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "username={ADMIN_USER}&password={ADMIN_PASSWORD}&next={next}"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{next}");
        assert_eq!(response.headers()["location"], "/admin", "{next}");
        let shown = client
            .get(format!("{}/admin/login?next={next}", env.base))
            .send()
            .await
            .unwrap();
        assert_eq!(shown.status(), StatusCode::OK, "{next}");
    }
}

async fn bulk_actions_cancel_the_selected_then_all_matching_and_retry_them(backend: Backend) {
    let env = TestEnv::on(backend).await;
    let admin = env.login(ADMIN_USER, ADMIN_PASSWORD).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // Three spawns wait in the queue: no worker runs.
    let mut jobs = vec![];
    for i in 0..3 {
        let user = env.user(&format!("bulk{i}"));
        env.create_user(&user).await;
        let (_, body) = env
            .call(Method::POST, &format!("/api/v1/users/{user}/server"), None)
            .await;
        jobs.push(body["job_id"].as_str().unwrap().to_owned());
    }
    let bulk = async |form: String| {
        let response = client
            .post(format!("{}/admin/jobs/bulk", env.base))
            .header("cookie", format!("berth_session={admin}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        response.headers()["location"].to_str().unwrap().to_owned()
    };
    let state = async |id: &str| {
        env.call(Method::GET, &format!("/api/v1/jobs/{id}"), None)
            .await
            .1["state"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let said = bulk(format!(
        "action=cancel&scope=selected&ids={}&ids={}&f_kind=spawn",
        jobs[0], jobs[1]
    ))
    .await;
    assert!(
        said.contains("Cancelled+2+jobs") || said.contains("Cancelled%202%20jobs"),
        "{said}"
    );
    assert_eq!(state(&jobs[0]).await, "cancelled");
    assert_eq!(state(&jobs[1]).await, "cancelled");
    assert_eq!(state(&jobs[2]).await, "queued");

    // All matching: only the one still queued is left to cancel.
    bulk("action=cancel&scope=matching&f_state=queued".into()).await;
    assert_eq!(state(&jobs[2]).await, "cancelled");
    let (_, limits) = env.call(Method::GET, "/api/v1/admin/limits", None).await;
    assert_eq!(limits["usage"]["active_servers"], 0, "{limits}");

    // Retrying every cancelled spawn makes three new queued jobs, each naming its original.
    let said = bulk("action=retry&scope=matching&f_state=cancelled&f_kind=spawn".into()).await;
    assert!(said.contains("Retried"), "{said}");
    let retries: Vec<(uuid::Uuid,)> = env
        .rows("select retry_of from jobs where retry_of is not null and state = 'queued'")
        .await;
    let mut of: Vec<String> = retries.into_iter().map(|(r,)| r.to_string()).collect();
    of.sort();
    let mut expected = jobs.clone();
    expected.sort();
    assert_eq!(of, expected);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The metrics text of a process on `port`, empty until it answers.
async fn scrape(port: u16) -> String {
    match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(r) if r.status() == StatusCode::OK => r.text().await.unwrap_or_default(),
        _ => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_and_scheduler_processes_serve_their_own_metrics() {
    let mut env = TestEnv::start().await;
    let (worker_port, scheduler_port) = (free_port(), free_port());
    let worker_listen = format!("127.0.0.1:{worker_port}");
    env.start_worker_process(&["--metrics-listen", &worker_listen]);
    let scheduler_listen = format!("127.0.0.1:{scheduler_port}");
    env.start_scheduler_process(&[
        "--cull-schedule",
        "* * * * * *",
        "--metrics-listen",
        &scheduler_listen,
    ]);
    let user = env.user("wm");
    env.create_user(&user).await;
    let path = format!("/api/v1/users/{user}/server");
    env.call(Method::POST, &path, None).await;
    env.wait_server(&path, Duration::from_secs(30), |s| s["state"] == "running")
        .await;
    // The worker counts the spawn it ran (and the culls it carried out); the API
    // process counted the enqueue, not the worker.
    wait_for(
        "the worker's spawn counters",
        Duration::from_secs(10),
        async || {
            let text = scrape(worker_port).await;
            sample(&text, "berth_jobs_started_total{kind=\"spawn\"}") == 1.0
                && sample(&text, "berth_jobs_succeeded_total{kind=\"spawn\"}") == 1.0
                && sample(&text, "berth_job_duration_seconds_count{kind=\"spawn\"}") == 1.0
        },
    )
    .await;
    let worker = scrape(worker_port).await;
    follows_conventions(&worker);
    assert_eq!(
        sample(&worker, "berth_jobs_enqueued_total{kind=\"spawn\"}"),
        0.0,
        "{worker}"
    );
    // The scheduler counts the ticks it enqueued.
    wait_for(
        "the scheduler's cull ticks",
        Duration::from_secs(15),
        async || {
            sample(
                &scrape(scheduler_port).await,
                "berth_jobs_enqueued_total{kind=\"cull\"}",
            ) >= 2.0
        },
    )
    .await;
    follows_conventions(&scrape(scheduler_port).await);
}
