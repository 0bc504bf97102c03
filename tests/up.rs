//! `berth up` with no database: the embedded store and local-process servers, in
//! one process, from an empty data directory; and everything still there after a
//! restart.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::wait_for;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// One data directory and the `berth up` processes started on it; kills them and
/// the servers they left, and removes the directory, also when the test fails.
struct Up {
    id: String,
    data: PathBuf,
    port: u16,
    children: Vec<Child>,
}

impl Up {
    fn new() -> Self {
        let id = format!("t{:08x}", rand::random::<u32>());
        let data = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("up-{id}"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self {
            id,
            data,
            port,
            children: vec![],
        }
    }

    /// Users' working directories: beside the data directory, not in it.
    fn homes(&self) -> PathBuf {
        self.data.with_extension("homes")
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `berth up` exactly as a newcomer types it, plus this test's instance, a
    /// server command without Python, and culling every second.
    fn command(&self, idle_timeout: &str, log: &str) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_berth"));
        command
            .arg("up")
            .env_remove("BERTH_DATABASE_URL")
            .env("BERTH_DATA_DIR", &self.data)
            .env("BERTH_HOMES_DIR", self.homes())
            .env("BERTH_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("BERTH_INSTANCE", &self.id)
            .env("BERTH_SPAWNER", "process")
            .env(
                "BERTH_SERVER_COMMAND",
                "echo hello from {user}; exec busybox httpd -f -p 127.0.0.1:{port}",
            )
            .env("BERTH_CULL_SCHEDULE", "* * * * * *")
            .env("BERTH_IDLE_TIMEOUT", idle_timeout)
            .env("BERTH_CULL_EXEMPT_ADMINS", "true")
            .env("BERTH_RECONCILE_INTERVAL", "1")
            .env("BERTH_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.data.join(log)).unwrap());
        command
    }

    /// Starts `berth up`; returns once the API answers.
    async fn start(&mut self, idle_timeout: &str, log: &str) -> usize {
        self.start_with(idle_timeout, log, &[]).await
    }

    /// `start` with more settings.
    async fn start_with(&mut self, idle_timeout: &str, log: &str, env: &[(&str, &str)]) -> usize {
        std::fs::create_dir_all(&self.data).unwrap();
        let child = self
            .command(idle_timeout, log)
            .envs(env.iter().copied())
            .spawn()
            .expect("start berth up");
        self.children.push(child);
        let health = format!("{}/health", self.base());
        wait_for("berth up to answer", Duration::from_secs(30), async || {
            reqwest::get(&health)
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        self.children.len() - 1
    }

    async fn terminate(&mut self, index: usize) -> std::process::ExitStatus {
        let child = &mut self.children[index];
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "berth up did not stop"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.data.join(name)).unwrap_or_default()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let run = self.data.join(&self.id).join("run");
        for dir in std::fs::read_dir(run).into_iter().flatten().flatten() {
            if let Some(pid) = std::fs::read_to_string(dir.path().join("pid"))
                .ok()
                .and_then(|p| p.split_whitespace().next().map(str::to_owned))
            {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.data);
        let _ = std::fs::remove_dir_all(self.homes());
    }
}

async fn call(
    base: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = reqwest::Client::new()
        .request(method, format!("{base}{path}"))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("berth answers");
    let status = response.status();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn login(base: &str, password: &str) -> String {
    let response = reqwest::Client::new()
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"username": "admin", "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

async fn wait_state(base: &str, token: &str, path: &str, state: &str) -> Value {
    let mut last = Value::Null;
    wait_for(
        &format!("{path} to be {state}"),
        Duration::from_secs(30),
        async || {
            last = call(base, token, Method::GET, path, None).await.1;
            last["state"] == state
        },
    )
    .await;
    last
}

async fn answers(url: &str) -> bool {
    reqwest::get(url).await.is_ok()
}

/// Reads the embedded database from outside (WAL lets readers in while it runs).
async fn count(data: &Path, sql: &'static str) -> i64 {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(data.join("berth.db"))
        .read_only(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let n = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
    pool.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn berth_up_runs_from_an_empty_data_directory_and_keeps_everything_across_a_restart() {
    let mut up = Up::new();
    let base = up.base();
    let first = up.start("4", "first.log").await;

    // The banner tells a newcomer where everything is and how to log in.
    let password_file = up.data.join("admin-password");
    wait_for("the banner", Duration::from_secs(10), async || {
        up.log("first.log").contains("dashboard")
    })
    .await;
    let banner = up.log("first.log");
    assert!(banner.contains(&format!("{base}/api/v1")), "{banner}");
    assert!(
        banner.contains("the same OS user as Berth") && banner.contains("not a class"),
        "local servers without a user of their own are said to be so: {banner}"
    );
    assert!(banner.contains(&format!("{base}/admin")), "{banner}");
    assert!(
        banner.contains(&password_file.display().to_string()),
        "{banner}"
    );
    let password = std::fs::read_to_string(&password_file).unwrap();
    let token = login(&base, password.trim()).await;

    // A user's server: spawned as a local process, answering, its output shown.
    let alice = format!("alice-{}", up.id);
    let (status, _) = call(
        &base,
        &token,
        Method::POST,
        &format!("/api/v1/users/{alice}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let path = format!("/api/v1/users/{alice}/server");
    let (status, spawned) = call(&base, &token, Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{spawned}");
    let first_job = spawned["job_id"].as_str().unwrap().to_owned();
    let running = wait_state(&base, &token, &path, "running").await;
    let url = running["internal_url"].as_str().unwrap().to_owned();
    assert!(answers(&url).await, "the server answers at {url}");
    let log = reqwest::Client::new()
        .get(format!("{base}{path}/log"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(log.status(), StatusCode::OK);
    let log = log.text().await.unwrap();
    let hello = format!("hello from {alice}");
    assert!(log.lines().any(|l| l == hello), "{log}");
    // The same output from the dashboard, linked from the user's page.
    let dashboard = async |path: &str| {
        let answer = reqwest::Client::new()
            .get(format!("{base}{path}"))
            .header("cookie", format!("berth_session={token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), StatusCode::OK, "{path}");
        answer.text().await.unwrap()
    };
    let page = dashboard(&format!("/admin/users/{alice}")).await;
    let link = format!("/admin/users/{alice}/log?server=");
    assert!(page.contains(&format!("href=\"{link}\"")), "{page}");
    let shown = dashboard(&link).await;
    assert!(shown.lines().any(|l| l == hello), "{shown}");

    // Stopped on request: the process is gone.
    let (status, _) = call(&base, &token, Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    wait_state(&base, &token, &path, "stopped").await;
    assert!(!answers(&url).await, "the stopped server still answers");

    // Spawned again and left idle: the scheduler culls it.
    let (status, _) = call(&base, &token, Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let again = wait_state(&base, &token, &path, "running").await;
    let url = again["internal_url"].as_str().unwrap().to_owned();
    wait_state(&base, &token, &path, "stopped").await;
    assert!(!answers(&url).await, "the culled server still answers");
    let culls = count(
        &up.data,
        "select count(*) from jobs where kind = 'cull' and state = 'succeeded'",
    )
    .await;
    assert!(culls >= 1, "culled by a cull job");
    let log = call(&base, &token, Method::GET, &format!("{path}/log"), None)
        .await
        .1;
    let log = log.as_str().unwrap_or_default().to_owned();
    assert_eq!(
        log.lines().filter(|l| *l == hello).count(),
        2,
        "each run's output is kept: {log}"
    );

    // An admin's server is exempt from culling and outlives the restart.
    let bob = format!("bob-{}", up.id);
    let (status, _) = call(
        &base,
        &token,
        Method::POST,
        &format!("/api/v1/users/{bob}"),
        Some(json!({"admin": true})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let bob_path = format!("/api/v1/users/{bob}/server");
    call(&base, &token, Method::POST, &bob_path, None).await;
    let bob_server = wait_state(&base, &token, &bob_path, "running").await;
    let bob_url = bob_server["internal_url"].as_str().unwrap().to_owned();
    let jobs_before = count(&up.data, "select count(*) from jobs").await;

    // A second `berth up` on the same directory is refused while the first runs.
    let second = up.command("4", "second.log").output().unwrap();
    assert!(!second.status.success());
    let refused = up.log("second.log");
    assert!(refused.contains("another Berth process"), "{refused}");

    // Restart: SIGTERM, then `berth up` again on the same directory.
    assert!(
        up.terminate(first).await.success(),
        "berth up exits 0 on SIGTERM"
    );
    assert!(
        answers(&bob_url).await,
        "servers outlive a restart of berth up"
    );
    up.start("4", "third.log").await;
    // The same session still works: the signing key and sessions were kept.
    let (status, users) = call(&base, &token, Method::GET, "/api/v1/users", None).await;
    assert_eq!(status, StatusCode::OK, "{users}");
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&alice.as_str()) && names.contains(&bob.as_str()),
        "{names:?}"
    );
    let (_, alice_server) = call(&base, &token, Method::GET, &path, None).await;
    assert_eq!(alice_server["state"], "stopped", "{alice_server}");
    // Reconciled after the restart and found alive: still running, still answering.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, bob_server) = call(&base, &token, Method::GET, &bob_path, None).await;
    assert_eq!(bob_server["state"], "running", "{bob_server}");
    assert_eq!(bob_server["internal_url"], bob_url.as_str());
    assert!(answers(&bob_url).await);
    let (status, job) = call(
        &base,
        &token,
        Method::GET,
        &format!("/api/v1/jobs/{first_job}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(count(&up.data, "select count(*) from jobs").await >= jobs_before);
    // The password file's login still works after the restart.
    login(&base, password.trim()).await;

    // Stopping through the restarted Berth ends the server it did not start.
    let (status, _) = call(&base, &token, Method::DELETE, &bob_path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    wait_state(&base, &token, &bob_path, "stopped").await;
    assert!(!answers(&bob_url).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_servers_run_as_another_user_cannot_read_berths_secrets() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned)),
        Some("0".into()),
        "this test starts servers as another OS user, which needs root (ops/test.sh runs as root)"
    );
    let mut up = Up::new();
    let base = up.base();
    let data = up.data.display().to_string();
    // A server that tries what the penetration test did, then serves.
    let snoop = format!(
        "cat {data}/admin-password; cat {data}/jwt-key.pem; ls {data}; \
         echo owned > {data}/berth.db-probe; echo uid=$(id -u); \
         exec busybox httpd -f -p 127.0.0.1:{{port}}"
    );
    std::fs::create_dir_all(&up.data).unwrap();
    let child = up
        .command("3600", "first.log")
        .env("BERTH_PROCESS_USER", "nobody")
        .env("BERTH_SERVER_COMMAND", &snoop)
        .spawn()
        .unwrap();
    up.children.push(child);
    let health = format!("{base}/health");
    wait_for("berth up to answer", Duration::from_secs(30), async || {
        reqwest::get(&health)
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    wait_for("the banner", Duration::from_secs(10), async || {
        up.log("first.log").contains("dashboard")
    })
    .await;
    let banner = up.log("first.log");
    assert!(banner.contains("run as nobody"), "{banner}");

    let password = std::fs::read_to_string(up.data.join("admin-password")).unwrap();
    let token = login(&base, password.trim()).await;
    let eve = format!("eve-{}", up.id);
    call(
        &base,
        &token,
        Method::POST,
        &format!("/api/v1/users/{eve}"),
        None,
    )
    .await;
    let path = format!("/api/v1/users/{eve}/server");
    call(&base, &token, Method::POST, &path, None).await;
    wait_state(&base, &token, &path, "running").await;
    let log = call(&base, &token, Method::GET, &format!("{path}/log"), None)
        .await
        .1;
    let log = log.as_str().unwrap_or_default().to_owned();
    assert!(
        log.contains("uid=65534"),
        "the server runs as nobody: {log}"
    );
    assert!(
        !log.contains(password.trim())
            && !log.contains("PRIVATE KEY")
            && !log.lines().any(|l| l == "berth.db"),
        "the server read Berth's files: {log}"
    );
    assert!(log.contains("Permission denied"), "{log}");
    assert!(
        !up.data.join("berth.db-probe").exists(),
        "the server wrote into the data directory"
    );

    // Berth's files are its own; the user's working directory is apart, and theirs.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&up.data), 0o700);
    for file in ["berth.db", "admin-password", "jwt-key.pem"] {
        assert_eq!(mode(&up.data.join(file)), 0o600, "{file}");
    }
    // And every other file there: the database's WAL, the servers' logs…
    let mut dirs = vec![up.data.clone()];
    let mut files = vec![];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.is_file()
                // What the test captured of berth's output, not Berth's.
                && !(dir == up.data && path.extension().is_some_and(|e| e == "log"))
            {
                files.push(path);
            }
        }
    }
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().ends_with("berth.db-wal"))
            && files
                .iter()
                .any(|f| f.extension().is_some_and(|e| e == "log")),
        "{files:?}"
    );
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    let home = up.homes().join(&up.id).join(&eve);
    assert!(!home.starts_with(&up.data));
    assert_eq!(std::fs::metadata(&home).unwrap().uid(), 65534);
}

/// The README's example block, run as written against a fresh `berth up`: only its
/// address and data directory are this test's, and every `curl` in it fails the
/// script on an HTTP error, so a broken example fails CI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_examples_run_as_written() {
    let readme = include_str!("../README.md");
    let marker = "<!-- README example: tests/up.rs runs this block -->";
    let (_, after) = readme
        .split_once(marker)
        .expect("the README marks its example");
    let block = after
        .trim_start()
        .strip_prefix("```sh\n")
        .expect("a sh block follows the marker");
    let script = &block[..block.find("\n```").expect("the block ends")];
    assert!(script.matches("curl").count() >= 10, "{script}");

    let mut up = Up::new();
    up.start("3600", "readme.log").await;
    let script = script
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{}", up.port))
        .replace("berth-data/", &format!("{}/", up.data.display()));
    let wrapped = format!(
        "set -euo pipefail\n\
         curl() {{ command curl -sS --fail-with-body --max-time 20 \"$@\"; echo; }}\n\
         {script}\n"
    );
    let out = tokio::process::Command::new("timeout")
        .args(["120", "bash", "-c", &wrapped])
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the README's example failed ({}):\n{text}\n{}",
        out.status,
        up.log("readme.log")
    );
    // What its comments promise.
    for promised in [
        r#""name":"alice","email":null,"role":"user""#,
        r#""kind":"spawn""#,
        r#""state":"running""#,
        r#""ready":true"#,
        "/user/alice/",
        r#""status":"ok""#,
    ] {
        assert!(text.contains(promised), "{promised} not in:\n{text}");
    }
}

/// With `BERTH_LOG_FORMAT=json` every line on stderr is JSON, the banner too, and
/// so is the reason a start fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_only_json_lines_banner_and_failures_included() {
    let mut up = Up::new();
    let first = up
        .start_with("3600", "json.log", &[("BERTH_LOG_FORMAT", "json")])
        .await;
    wait_for("the banner", Duration::from_secs(15), async || {
        up.log("json.log")
            .contains("berth is up on its embedded store")
    })
    .await;
    assert!(up.terminate(first).await.success());
    let log = up.log("json.log");
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{log}")))
        .collect();
    let banner = lines
        .iter()
        .find(|l| l["fields"]["message"] == "berth is up on its embedded store")
        .unwrap_or_else(|| panic!("no banner in {log}"));
    let api = format!("http://127.0.0.1:{}/api/v1", up.port);
    assert_eq!(banner["fields"]["api"], api.as_str(), "{banner}");
    assert!(
        banner["fields"]["login"]
            .as_str()
            .unwrap()
            .contains("admin-password"),
        "{banner}"
    );

    // A start that fails says why in one JSON line.
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("api")
        .env("BERTH_LOG_FORMAT", "json")
        .env("BERTH_DATABASE_URL", "postgres://berth@127.0.0.1:1/berth")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failure: Value = serde_json::from_str(stderr.trim())
        .unwrap_or_else(|e| panic!("not one JSON line ({e}): {stderr}"));
    assert_eq!(failure["level"], "ERROR");
    assert!(
        failure["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("Connection refused"),
        "{failure}"
    );
}
