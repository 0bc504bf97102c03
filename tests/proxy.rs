//! The users' way in: servers reached through Berth's proxy, from a browser that
//! followed an SSO hand-off and from API clients, with a real Jupyter server and
//! kernel, real containers, several `berth proxy` replicas, and the activity the
//! culler reads taken from real traffic.

mod common;

use std::time::Duration;

use common::{
    Backend, TestEnv,
    browser::{Driver, see},
    local::{Leftovers, data_dir, jupyter_command},
    wait_for,
};
use futures::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

const PASSWORD: &str = "a long enough password";

/// Jupyter takes a few seconds to start; more on a loaded machine.
const JUPYTER_WITHIN: Duration = Duration::from_secs(90);

/// A client that does not follow redirects, so that tests see them.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A worker whose servers are Jupyter servers, as local processes; what they
/// leave is removed when the returned guard drops.
fn start_jupyter_worker(env: &mut TestEnv) -> Leftovers {
    let (data, leftovers) = data_dir(&env.id);
    let data = data.to_string_lossy().into_owned();
    let homes = leftovers.homes().to_string_lossy().into_owned();
    let command = jupyter_command();
    env.start_worker(&[
        "--spawner",
        "process",
        "--server-command",
        &command,
        "--data-dir",
        &data,
        "--homes-dir",
        &homes,
        "--start-timeout",
        "80",
    ]);
    leftovers
}

/// Starts `user`'s default server as the user and waits until it runs.
async fn start_server(env: &TestEnv, user: &str, token: &str, within: Duration) -> Value {
    let path = format!("/api/v1/users/{user}/server");
    let (status, body) = env.call_with(Method::POST, &path, None, Some(token)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    env.wait_server(&path, within, |s| s["state"] == "running")
        .await
}

/// The hand-off URL for `user`'s default server.
async fn hand_off(env: &TestEnv, user: &str, token: &str) -> String {
    let (status, sso) = env
        .call_with(
            Method::POST,
            &format!("/api/v1/users/{user}/server/sso"),
            None,
            Some(token),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{sso}");
    sso["url"].as_str().unwrap().to_owned()
}

/// Lands a hand-off on `base` (a proxy): the cookie it sets.
async fn land(base: &str, url: &str) -> String {
    let url = url.replacen(&url[..url.find("/user/").unwrap()], base, 1);
    let response = client().get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FOUND, "{url}");
    let cookie = response.headers()[header::SET_COOKIE].to_str().unwrap();
    cookie.split(';').next().unwrap().to_owned()
}

/// Where a user's server answers a kernel's code, through the proxy: creates a
/// kernel over REST, runs `code` on its WebSocket channel and returns the result.
async fn run_code(base: &str, user: &str, credential: &Credential, code: &str) -> String {
    let (status, kernel) = through(base, user, "api/kernels", credential, Method::POST).await;
    assert_eq!(status, StatusCode::CREATED, "{kernel}");
    let id = kernel["id"].as_str().unwrap();
    let ws = base.replacen("http", "ws", 1);
    let mut request = format!("{ws}/user/{user}/api/kernels/{id}/channels")
        .into_client_request()
        .unwrap();
    let (name, value) = credential.header();
    request.headers_mut().insert(name, value.parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the kernel's WebSocket opens through the proxy");
    let msg_id = uuid::Uuid::new_v4().to_string();
    let execute = json!({
        "header": { "msg_id": msg_id, "username": user, "session": uuid::Uuid::new_v4().to_string(),
                    "msg_type": "execute_request", "version": "5.3", "date": "" },
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": { "code": code, "silent": false, "store_history": true,
                     "user_expressions": {}, "allow_stdin": false },
    });
    socket
        .send(Message::text(execute.to_string()))
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(message) = socket.next().await {
            let Ok(Message::Text(text)) = message else {
                continue;
            };
            let reply: Value = serde_json::from_str(&text).unwrap();
            if reply["msg_type"] == "execute_result" && reply["parent_header"]["msg_id"] == msg_id {
                return reply["content"]["data"]["text/plain"]
                    .as_str()
                    .unwrap()
                    .to_owned();
            }
        }
        panic!("the kernel's channel closed without a result");
    })
    .await
    .expect("the kernel answers within a minute");
    let _ = socket.close(None).await;
    result
}

/// How a test proves who it is at the proxy.
enum Credential {
    Cookie(String),
    Bearer(String),
}

impl Credential {
    fn header(&self) -> (header::HeaderName, String) {
        match self {
            Credential::Cookie(c) => (header::COOKIE, c.clone()),
            Credential::Bearer(t) => (header::AUTHORIZATION, format!("Bearer {t}")),
        }
    }
}

/// A request through the proxy at `base` to `path` under the user's default server.
async fn through(
    base: &str,
    user: &str,
    path: &str,
    credential: &Credential,
    method: Method,
) -> (StatusCode, Value) {
    let (name, value) = credential.header();
    let response = client()
        .request(method, format!("{base}/user/{user}/{path}"))
        .header(name, value)
        .header(header::CONTENT_TYPE, "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The server's last activity, as the API shows it.
async fn last_activity(env: &TestEnv, user: &str) -> chrono::DateTime<chrono::Utc> {
    let (_, server) = env
        .call(Method::GET, &format!("/api/v1/users/{user}/server"), None)
        .await;
    server["last_activity"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_follows_the_hand_off_into_jupyter_and_runs_a_kernel_through_the_proxy() {
    let mut env = TestEnv::start().await;
    let _leftovers = start_jupyter_worker(&mut env);
    let alice = env.user("alice");
    let token = env.register(&alice, PASSWORD).await;
    let server = start_server(&env, &alice, &token, JUPYTER_WITHIN).await;
    assert_eq!(server["url"], format!("{}/user/{alice}/", env.base));
    assert!(
        server["internal_url"].is_string(),
        "admins see where it runs"
    );
    let (_, own_view) = env
        .call_with(
            Method::GET,
            &format!("/api/v1/users/{alice}/server"),
            None,
            Some(&token),
        )
        .await;
    assert_eq!(own_view["url"], server["url"]);
    assert!(
        own_view.get("internal_url").is_none(),
        "users do not: {own_view}"
    );

    // The browser follows the hand-off: it lands on Jupyter under the user's
    // prefix, and the token is gone from the address.
    let url = hand_off(&env, &alice, &token).await;
    assert!(
        url.starts_with(&format!("{}/user/{alice}/?berth_sso=", env.base)),
        "{url}"
    );
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    browser.goto(&url).await.unwrap();
    wait_for("Jupyter's page", JUPYTER_WITHIN, async || {
        browser.title().await.is_ok_and(|t| t.contains("Jupyter"))
    })
    .await;
    let here = browser.current_url().await.unwrap();
    assert_eq!(here.path(), format!("/user/{alice}/"));
    assert!(!here.as_str().contains("berth_sso"), "{here}");

    // In the page: a kernel over REST, its WebSocket channel, 6*7.
    let script = r#"
        const [user, done] = [arguments[0], arguments[arguments.length - 1]];
        (async () => {
          const base = `/user/${user}/`;
          const made = await fetch(base + 'api/kernels', { method: 'POST', body: '{}',
                                   headers: { 'Content-Type': 'application/json' } });
          if (made.status !== 201) return done('kernel: ' + made.status);
          const kernel = await made.json();
          const socket = new WebSocket(`ws://${location.host}${base}api/kernels/${kernel.id}/channels`);
          const msgId = crypto.randomUUID();
          socket.onerror = () => done('websocket error');
          socket.onopen = () => socket.send(JSON.stringify({
            header: { msg_id: msgId, username: user, session: crypto.randomUUID(),
                      msg_type: 'execute_request', version: '5.3', date: '' },
            parent_header: {}, metadata: {}, channel: 'shell',
            content: { code: '6*7', silent: false, store_history: true,
                       user_expressions: {}, allow_stdin: false } }));
          socket.onmessage = (e) => {
            const reply = JSON.parse(e.data);
            if (reply.msg_type === 'execute_result' && reply.parent_header.msg_id === msgId) {
              socket.close();
              done(reply.content.data['text/plain']);
            }
          };
        })().catch((e) => done('error: ' + e));
    "#;
    let answer = browser
        .execute_async(script, vec![json!(alice)])
        .await
        .expect("the script ends");
    assert_eq!(answer, json!("42"), "the kernel ran 6*7 through the proxy");

    // Anyone else is refused: another user's token, and no credential at all.
    let bob = env.user("bob");
    let bob_token = env.register(&bob, PASSWORD).await;
    let (status, body) = through(
        &env.base,
        &alice,
        "api/status",
        &Credential::Bearer(bob_token),
        Method::GET,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "forbidden");
    let stranger = client()
        .get(format!("{}/user/{alice}/api/status", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(stranger.status(), StatusCode::UNAUTHORIZED);
    // The browser's cookie is Alice's only: Bob's path does not get it.
    browser
        .goto(&format!("{}/user/{bob}/", env.base))
        .await
        .unwrap();
    see(&browser, "h1", "Not logged in").await;

    // Stopped: the page says so and offers a start; the start goes through the
    // starting page (which follows the progress) back into Jupyter.
    let (status, _) = env
        .call(
            Method::DELETE,
            &format!("/api/v1/users/{alice}/server"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    env.wait_server(
        &format!("/api/v1/users/{alice}/server"),
        Duration::from_secs(30),
        |s| s["state"] == "stopped",
    )
    .await;
    browser
        .goto(&format!("{}/user/{alice}/", env.base))
        .await
        .unwrap();
    see(&browser, "h1", "Your server is stopped").await;
    browser
        .find(fantoccini::Locator::Css("form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + JUPYTER_WITHIN;
    loop {
        let title = browser.title().await.unwrap_or_default();
        if title.contains("Jupyter") {
            break;
        }
        assert!(
            title.contains("Starting") || title.contains("Not running"),
            "the starting page, then Jupyter: {title}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "Jupyter never came back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let png = browser.screenshot().await.unwrap();
    let artefacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("artefacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    std::fs::write(artefacts.join("proxy-jupyter.png"), &png).unwrap();
    let _ = browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kernel_messages_keep_a_server_alive_and_a_polling_tab_does_not() {
    let mut env = TestEnv::start_with(&["--proxy-activity-interval", "1"]).await;
    let _leftovers = start_jupyter_worker(&mut env);
    let (busy, idle) = (env.user("busy"), env.user("idle"));
    let mut cookies = vec![];
    for user in [&busy, &idle] {
        let token = env.register(user, PASSWORD).await;
        start_server(&env, user, &token, JUPYTER_WITHIN).await;
        let url = hand_off(&env, user, &token).await;
        cookies.push(Credential::Cookie(land(&env.base, &url).await));
    }
    let [busy_cookie, idle_cookie] = <[Credential; 2]>::try_from(cookies).ok().unwrap();

    // A tab that only polls what Jupyter polls by itself moves nothing.
    let idle_before = last_activity(&env, &idle).await;
    for _ in 0..4 {
        for path in ["api/kernels", "api/sessions", "api/terminals", "api/status"] {
            let (status, _) = through(&env.base, &idle, path, &idle_cookie, Method::GET).await;
            assert_eq!(status, StatusCode::OK, "{path}");
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert_eq!(last_activity(&env, &idle).await, idle_before);

    // Someone running code moves it (the kernel's messages are the activity).
    let busy_before = last_activity(&env, &busy).await;
    assert_eq!(run_code(&env.base, &busy, &busy_cookie, "6*7").await, "42");
    wait_for(
        "the busy server's activity",
        Duration::from_secs(10),
        async || last_activity(&env, &busy).await > busy_before,
    )
    .await;

    // The culler stops the idle server and keeps the one in use.
    let busy_path = format!("/api/v1/users/{busy}/server");
    let idle_path = format!("/api/v1/users/{idle}/server");
    let keep_busy = {
        let (base, busy, cookie) = (env.base.clone(), busy.clone(), busy_cookie);
        tokio::spawn(async move {
            loop {
                run_code(&base, &busy, &cookie, "1+1").await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let cull = env.start_scheduler(&["--cull-schedule", "* * * * * *", "--idle-timeout", "4"]);
    env.wait_server(&idle_path, Duration::from_secs(30), |s| {
        s["state"] == "stopped"
    })
    .await;
    let (_, still) = env.call(Method::GET, &busy_path, None).await;
    assert_eq!(still["state"], "running", "{still}");
    cull.cancel();
    keep_busy.abort();
}

async fn docker_servers_are_reached_only_through_the_proxy(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    env.start_worker(&[]);
    let ann = env.user("ann");
    let token = env.register(&ann, PASSWORD).await;
    let server = start_server(&env, &ann, &token, Duration::from_secs(30)).await;
    let container = env.container(&ann);
    let secret = env.container_env(&container, "BERTH_PROXY_TOKEN");
    let (_, admin_view) = env
        .call(Method::GET, &format!("/api/v1/users/{ann}/server"), None)
        .await;
    let internal = admin_view["internal_url"].as_str().unwrap().to_owned();
    assert_ne!(server["url"], admin_view["internal_url"]);

    // Through the proxy with the user's token: the prefix kept, the proxy's own
    // cookie and the user's token kept from the server, X-Forwarded-For set.
    let page = client()
        .get(format!("{}/user/{ann}/notebooks/a.ipynb?x=1", env.base))
        .bearer_auth(&token)
        .header(header::COOKIE, "berth_proxy=not-for-servers; theme=dark")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let page = page.text().await.unwrap();
    assert!(
        page.contains(&format!("path=/user/{ann}/notebooks/a.ipynb?x=1")),
        "{page}"
    );
    assert!(page.contains("cookie=theme=dark</p>"), "{page}");
    assert!(page.contains("forwarded-for=127.0.0.1"), "{page}");

    // Straight to the container: refused without the proxy's secret, let in with it.
    let direct = client().get(&internal).send().await.unwrap();
    assert_eq!(direct.status(), StatusCode::FORBIDDEN);
    let direct = client()
        .get(format!("{internal}user/{ann}/"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        direct.status(),
        StatusCode::FORBIDDEN,
        "a user's token is not the secret"
    );
    let direct = client()
        .get(format!("{internal}user/{ann}/"))
        .header(header::AUTHORIZATION, format!("token {secret}"))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), StatusCode::OK);

    // With the browser's cookie, another site can neither post nor open a
    // WebSocket (a cross-site WebSocket would act as the user).
    let cookie = land(&env.base, &hand_off(&env, &ann, &token).await).await;
    for (method, upgrade) in [(Method::POST, false), (Method::GET, true)] {
        let mut request = client()
            .request(
                method.clone(),
                format!("{}/user/{ann}/api/kernels", env.base),
            )
            .header(header::COOKIE, &cookie)
            .header(header::ORIGIN, "http://evil.example");
        if upgrade {
            request = request
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        }
        let refused = request.send().await.unwrap();
        assert_eq!(
            refused.status(),
            StatusCode::FORBIDDEN,
            "{method} upgrade={upgrade}"
        );
    }
    let same_site = client()
        .post(format!("{}/user/{ann}/api/kernels", env.base))
        .header(header::COOKIE, &cookie)
        .header(header::ORIGIN, &env.base)
        .send()
        .await
        .unwrap();
    assert_eq!(
        same_site.status(),
        StatusCode::OK,
        "the test server answers any method"
    );

    // A service token needs servers:access, which admin does not imply.
    let reader = env.service_token(&["admin"]).await;
    let (status, _) = through(
        &env.base,
        &ann,
        "",
        &Credential::Bearer(reader),
        Method::GET,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let access = env.service_token(&["servers:access"]).await;
    let (status, _) = through(
        &env.base,
        &ann,
        "",
        &Credential::Bearer(access),
        Method::GET,
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // A server that does not answer (its container killed under it): 502, said so.
    let killed = std::process::Command::new("docker")
        .args(["kill", &container])
        .status()
        .unwrap();
    assert!(killed.success());
    let (status, body) =
        through(&env.base, &ann, "", &Credential::Bearer(token), Method::GET).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"], "bad_gateway");
}

async fn a_servers_own_token_reports_its_own_activity_only(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    env.start_worker(&[]);
    let (ann, bea) = (env.user("ann"), env.user("bea"));
    for user in [&ann, &bea] {
        let token = env.register(user, PASSWORD).await;
        start_server(&env, user, &token, Duration::from_secs(30)).await;
    }
    let own = env.container_env(&env.container(&ann), "BERTH_API_TOKEN");
    let now = chrono::Utc::now().to_rfc3339();
    let report = |servers: Value| json!({ "servers": servers }).to_string();
    let (status, body) = env
        .call_with(
            Method::POST,
            &format!("/api/v1/users/{ann}/activity"),
            Some(&report(json!({ "": { "last_activity": now } }))),
            Some(&own),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, _) = env
        .call_with(
            Method::POST,
            &format!("/api/v1/users/{ann}/server/heartbeat"),
            None,
            Some(&own),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for (path, body) in [
        (
            format!("/api/v1/users/{bea}/activity"),
            Some(report(json!({ "": { "last_activity": now } }))),
        ),
        (format!("/api/v1/users/{bea}/server/heartbeat"), None),
        (
            format!("/api/v1/users/{ann}/activity"),
            Some(report(json!({ "other": { "last_activity": now } }))),
        ),
    ] {
        let (status, answer) = env
            .call_with(Method::POST, &path, body.as_deref(), Some(&own))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_proxy_replicas_serve_the_same_routes_and_a_killed_one_loses_nothing() {
    let mut env = TestEnv::start().await;
    env.start_worker(&[]);
    let (first, one) = env.start_proxy_process().await;
    let (_, two) = env.start_proxy_process().await;
    // The server is requested on another API process than the test's own.
    env.start_api_process().await;
    let ann = env.user("ann");
    let token = env.register(&ann, PASSWORD).await;
    start_server(&env, &ann, &token, Duration::from_secs(30)).await;

    // A hand-off landed on one replica is a session on every one.
    let cookie = Credential::Cookie(land(&one, &hand_off(&env, &ann, &token).await).await);
    for base in [&one, &two] {
        let (status, page) = through(base, &ann, "lab", &cookie, Method::GET).await;
        assert_eq!(status, StatusCode::OK, "{base}: {page}");
        assert!(
            page.as_str()
                .unwrap()
                .contains(&format!("path=/user/{ann}/lab"))
        );
    }

    // One replica dies; the other serves on, and a new one knows every route.
    env.kill_worker(first);
    let (_, three) = env.start_proxy_process().await;
    for base in [&two, &three] {
        let (status, _) = through(base, &ann, "", &cookie, Method::GET).await;
        assert_eq!(status, StatusCode::OK, "{base}");
    }

    // A stop is seen by every replica at once, not when a cache runs out.
    let (status, _) = env
        .call(Method::DELETE, &format!("/api/v1/users/{ann}/server"), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    for base in [&two, &three] {
        wait_for(
            "the replica to see the stop",
            Duration::from_secs(4),
            async || {
                let (status, _) = through(base, &ann, "", &cookie, Method::GET).await;
                status == StatusCode::CONFLICT || status == StatusCode::SERVICE_UNAVAILABLE
            },
        )
        .await;
    }

    // Logging out of the session that asked for the hand-off ends the proxy's.
    env.wait_server(
        &format!("/api/v1/users/{ann}/server"),
        Duration::from_secs(30),
        |s| s["state"] == "stopped",
    )
    .await;
    start_server(&env, &ann, &token, Duration::from_secs(30)).await;
    let cookie = Credential::Cookie(land(&two, &hand_off(&env, &ann, &token).await).await);
    let (status, _) = through(&three, &ann, "", &cookie, Method::GET).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = env
        .call_with(Method::POST, "/api/v1/auth/logout", None, Some(&token))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // What a replica proved is trusted for 2 s, and for 2 s more while one
    // request checks it again: 4 s at most, and slack for a loaded machine.
    for base in [&two, &three] {
        let mut last = None;
        let reached = tokio::time::timeout(Duration::from_secs(8), async {
            loop {
                let (status, answer) = through(base, &ann, "", &cookie, Method::GET).await;
                if status == StatusCode::UNAUTHORIZED {
                    break;
                }
                last = Some((status, answer));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(
            reached.is_ok(),
            "{base} still let the logged-out session in; its last answer: {last:?}"
        );
    }
}

on_every_store!(
    docker_servers_are_reached_only_through_the_proxy,
    a_servers_own_token_reports_its_own_activity_only,
);
