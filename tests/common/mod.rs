//! The end-to-end harness: a fresh database per test, the real API on port 0, real
//! workers (in-process or as `berth worker` processes) against the real Docker
//! engine. Everything a test creates carries its own id and is removed on drop,
//! also when the test fails.

#![allow(dead_code)]

pub mod browser;
pub mod local;

use std::{
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use clap::Parser;
use reqwest::{Method, StatusCode};
use schema::{PgStore, QueueSettings, SqliteStore, nats::NatsSettings};
use serde_json::Value;
use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio::{net::TcpListener, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

pub const TEST_IMAGE: &str = "berth-test-server:latest";
pub const MISSING_IMAGE: &str = "berth-no-such-image:latest";
pub const TOKEN: &str = "test-admin-token-0123456789";

fn admin_database_url() -> String {
    std::env::var("BERTH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

fn database_url(admin_url: &str, db: &str) -> String {
    let base = admin_url
        .rsplit_once('/')
        .map_or(admin_url, |(base, _)| base);
    format!("{base}/{db}")
}

fn nats_url() -> String {
    std::env::var("BERTH_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The store and queue backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Nats,
    /// The embedded store (`berth up` without a database): one process.
    Sqlite,
}

/// Where a test's state lives.
#[derive(Clone)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqliteStore),
}

/// Runs each listed `async fn(Backend)` test once per named backend, as
/// `name::postgres`, `name::nats`, `name::sqlite`: one suite, several backends.
#[macro_export]
macro_rules! tests_on {
    (@one $name:ident [$($test:ident => $backend:ident),+]) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::$name($crate::common::Backend::$backend).await
                }
            )+
        }
    };
    ($backends:tt $($name:ident),* $(,)?) => {
        $( $crate::tests_on!(@one $name $backends); )*
    };
}

/// On both queue backends (Postgres with apalis, NATS JetStream).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $crate::tests_on!([postgres => Postgres, nats => Nats] $($name),*);
    };
}

/// On both queue backends and on the embedded SQLite store: for tests that need
/// no second process (the embedded store is one process's).
#[macro_export]
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        $crate::tests_on!([postgres => Postgres, nats => Nats, sqlite => Sqlite] $($name),*);
    };
}

/// On Postgres and on the embedded SQLite store, for tests of the API and the
/// store that run no job.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        $crate::tests_on!([postgres => Postgres, sqlite => Sqlite] $($name),*);
    };
}

impl Db {
    /// The store a role is handed, as `berth` builds it: on Postgres with this
    /// test's queue backend (its relay runs as long as the test).
    pub async fn store(&self, queue: &QueueSettings) -> Arc<schema::Db> {
        match self {
            Db::Postgres(pool) => Arc::new(schema::Db::from(
                PgStore::open(pool.clone(), queue, CancellationToken::new())
                    .await
                    .expect("queue opens"),
            )),
            Db::Sqlite(store) => Arc::new(schema::Db::from(store.clone())),
        }
    }
}

/// Parses worker flags exactly as `berth worker` does, defaults included.
#[derive(Parser)]
struct WorkerFlags {
    #[command(flatten)]
    config: workers::WorkerConfig,
}

/// Parses scheduler flags exactly as `berth scheduler` does, defaults included.
#[derive(Parser)]
struct SchedulerFlags {
    #[command(flatten)]
    config: scheduler::SchedulerConfig,
}

/// Parses API flags exactly as `berth api` does, defaults included.
#[derive(Parser)]
struct ApiFlags {
    #[command(flatten)]
    config: api::ApiConfig,
}

pub const ADMIN_USER: &str = "root";
pub const ADMIN_PASSWORD: &str = "correct horse battery staple";

/// Serves the API over `db` on a free port; returns its base URL.
pub async fn serve_api(
    db: &Db,
    queue: &QueueSettings,
    jwt_pem: &str,
    api_flags: &[&str],
) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let allowed = format!("{TEST_IMAGE},{MISSING_IMAGE}");
    // `=` keeps clap from reading the PEM's leading dashes as a flag.
    let key_flag = format!("--jwt-private-key={jwt_pem}");
    let mut argv = vec![
        "api",
        "--admin-token",
        TOKEN,
        "--allowed-images",
        &allowed,
        &key_flag,
        "--admin-user",
        ADMIN_USER,
        "--admin-password",
        ADMIN_PASSWORD,
    ];
    // Tests register their users; one that is about registration says so itself.
    for (flag, value) in [
        ("--allow-registration", "true"),
        ("--registrations-per-address", "1000"),
    ] {
        if !api_flags.contains(&flag) {
            argv.extend([flag, value]);
        }
    }
    argv.extend_from_slice(api_flags);
    let config = ApiFlags::try_parse_from(argv)
        .expect("api flags parse")
        .config;
    let store = db.store(queue).await;
    let task = tokio::spawn(async move {
        api::run(
            config,
            store,
            listener,
            CancellationToken::new(),
            api::Serve::Both,
        )
        .await
        .expect("api runs");
    });
    // Ready once the admin account is bootstrapped and the port answers.
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get(format!("{base}/health")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the API did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (base, task)
}

/// A TCP relay in front of Postgres that a test can cut and restore, as a network
/// failure would.
pub struct DbProxy {
    pub addr: String,
    state: Arc<std::sync::Mutex<(bool, CancellationToken)>>,
}

impl DbProxy {
    pub async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(std::sync::Mutex::new((false, CancellationToken::new())));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (cut, generation) = shared.lock().unwrap().clone();
                if cut {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = generation.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Self { addr, state }
    }

    /// Drops every relayed connection and refuses new ones.
    pub fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.0 = true;
        state.1.cancel();
    }

    /// Relays again.
    pub fn restore(&self) {
        *self.state.lock().unwrap() = (false, CancellationToken::new());
    }
}

/// The host:port of the test Postgres.
pub fn database_address() -> String {
    let url = admin_database_url();
    let after_at = url.rsplit_once('@').map_or(url.as_str(), |(_, rest)| rest);
    after_at
        .split('/')
        .next()
        .unwrap_or("127.0.0.1:5432")
        .to_owned()
}

/// A fresh Ed25519 signing key as PKCS#8 PEM.
pub fn new_signing_key() -> String {
    use ed25519_dalek::pkcs8::{EncodePrivateKey, spki::der::pem::LineEnding};
    let seed: [u8; 32] = rand::random();
    ed25519_dalek::SigningKey::from_bytes(&seed)
        .to_pkcs8_pem(LineEnding::LF)
        .expect("pem")
        .to_string()
}

pub struct TestEnv {
    /// Unique per test: names, labels, the network and the database derive from it.
    pub id: String,
    pub db: Db,
    pub base: String,
    pub db_url: String,
    /// The key the API signs access tokens with, for tests that forge their own.
    pub jwt_pem: String,
    pub backend: Backend,
    /// This test's queue settings (with NATS, a stream of its own).
    pub queue: QueueSettings,
    http: reqwest::Client,
    db_name: String,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    children: Vec<Child>,
}

impl TestEnv {
    /// A migrated database and the API, with no worker yet. The database is ready
    /// once this returns: the admin account is bootstrapped.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// The same, with extra `berth api` flags.
    pub async fn start_with(api_flags: &[&str]) -> Self {
        Self::on_with(Backend::Postgres, api_flags).await
    }

    /// A migrated database and the API on the given queue backend.
    pub async fn on(backend: Backend) -> Self {
        Self::on_with(backend, &[]).await
    }

    /// The same, with extra `berth api` flags.
    pub async fn on_with(backend: Backend, api_flags: &[&str]) -> Self {
        match backend {
            Backend::Postgres => Self::on_queue(None, api_flags).await,
            Backend::Nats => Self::on_nats(|_| {}).await,
            Backend::Sqlite => Self::on_sqlite(api_flags).await,
        }
    }

    /// On NATS, with this test's settings (the broker's URL, deliveries…) applied
    /// before anything creates the stream.
    pub async fn on_nats(tune: impl FnOnce(&mut NatsSettings)) -> Self {
        let mut nats = NatsSettings::new(nats_url(), String::new());
        // Short, so that a killed worker's job is handed out again quickly.
        nats.ack_wait = Duration::from_secs(3);
        tune(&mut nats);
        Self::on_queue(Some(nats), &[]).await
    }

    async fn on_queue(nats: Option<NatsSettings>, api_flags: &[&str]) -> Self {
        Self::on_postgres(&admin_database_url(), nats, api_flags).await
    }

    /// On a Postgres of the test's own (and, on NATS, a broker of its own too), so
    /// that the test may restart them.
    pub async fn on_own(backend: Backend, postgres: &OwnPostgres, nats: Option<&OwnNats>) -> Self {
        let nats = match backend {
            Backend::Postgres => None,
            Backend::Nats => {
                let mut settings = NatsSettings::new(
                    nats.expect("a NATS test brings its broker").url.clone(),
                    String::new(),
                );
                settings.ack_wait = Duration::from_secs(3);
                Some(settings)
            }
            Backend::Sqlite => panic!("the embedded store has no database server to restart"),
        };
        Self::on_postgres(&postgres.admin_url, nats, &[]).await
    }

    async fn on_postgres(admin_url: &str, nats: Option<NatsSettings>, api_flags: &[&str]) -> Self {
        let id = format!("t{:08x}", rand::random::<u32>());
        let queue = match nats {
            None => QueueSettings::Postgres,
            Some(mut nats) => {
                nats.stream = format!("berth_{id}");
                QueueSettings::Nats(nats)
            }
        };
        let backend = match queue {
            QueueSettings::Postgres => Backend::Postgres,
            QueueSettings::Nats(_) => Backend::Nats,
        };
        let admin = PgPool::connect(admin_url)
            .await
            .expect("test Postgres is reachable");
        let db_name = format!("berth_{id}");
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {db_name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let db_url = database_url(admin_url, &db_name);
        let pool = PgPoolOptions::new()
            .max_connections(40)
            .connect(&db_url)
            .await
            .expect("connect to test database");
        schema::migrate(&pool).await.expect("migrations run");

        let db = Db::Postgres(pool);
        let jwt_pem = new_signing_key();
        let (base, api_task) = serve_api(&db, &queue, &jwt_pem, api_flags).await;
        let shutdown = CancellationToken::new();
        Self {
            id,
            db,
            base,
            db_url,
            jwt_pem,
            backend,
            queue,
            http: reqwest::Client::new(),
            db_name,
            shutdown,
            tasks: vec![api_task],
            children: vec![],
        }
    }

    /// The embedded store in a directory of this test's, and the API on it.
    async fn on_sqlite(api_flags: &[&str]) -> Self {
        let id = format!("t{:08x}", rand::random::<u32>());
        let dir = sqlite_dir(&id);
        let store = SqliteStore::open(&dir).await.expect("embedded store opens");
        let db = Db::Sqlite(store);
        let queue = QueueSettings::Postgres;
        let jwt_pem = new_signing_key();
        let (base, api_task) = serve_api(&db, &queue, &jwt_pem, api_flags).await;
        Self {
            id,
            db,
            base,
            db_url: String::new(),
            jwt_pem,
            backend: Backend::Sqlite,
            queue,
            http: reqwest::Client::new(),
            db_name: String::new(),
            shutdown: CancellationToken::new(),
            tasks: vec![api_task],
            children: vec![],
        }
    }

    /// This test's Postgres database; a test that calls it runs on Postgres only.
    pub fn pool(&self) -> &PgPool {
        match &self.db {
            Db::Postgres(pool) => pool,
            Db::Sqlite(_) => panic!("this test reads Postgres directly; run it on Postgres"),
        }
    }

    /// A user name unique to this test.
    pub fn user(&self, base: &str) -> String {
        format!("{base}-{}", self.id)
    }

    /// The container of `user`'s default server, as this test's instance names it.
    pub fn container(&self, user: &str) -> String {
        format!("berth_{}_{user}", self.id)
    }

    /// The container of `user`'s server `server`.
    pub fn container_of(&self, user: &str, server: &str) -> String {
        format!("berth_{}_{user}--{server}", self.id)
    }

    /// `user`'s volume, as this test's instance names it.
    pub fn volume(&self, user: &str) -> String {
        format!("berth_{}_user-{user}", self.id)
    }

    pub fn network(&self) -> String {
        format!("berth-{}", self.id)
    }

    /// The flags of a worker bound to this test's instance label and network;
    /// a flag in `extra` replaces the default one of the same name.
    pub fn worker_args(&self, extra: &[&str]) -> Vec<String> {
        let network = self.network();
        let defaults = [
            ("--image", TEST_IMAGE),
            ("--pull-policy", "if-not-present"),
            ("--mem-limit", "256M"),
            ("--cpu-limit", "0.5"),
            ("--pids-limit", "64"),
            ("--volume-path", "/data"),
            ("--start-timeout", "20"),
            ("--stop-timeout", "2"),
            ("--instance", self.id.as_str()),
            ("--network", network.as_str()),
        ];
        let mut args: Vec<String> = defaults
            .iter()
            .filter(|(flag, _)| !extra.contains(flag))
            .flat_map(|(flag, value)| [flag.to_string(), value.to_string()])
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts a worker inside the test process.
    pub fn start_worker(&mut self, extra: &[&str]) {
        match self.db.clone() {
            Db::Postgres(pool) => self.start_worker_on(pool, extra),
            db @ Db::Sqlite(_) => {
                let config = self.worker_config(extra);
                let (shutdown, queue) = (self.shutdown.clone(), self.queue.clone());
                self.tasks.push(tokio::spawn(async move {
                    workers::run(config, db.store(&queue).await, shutdown)
                        .await
                        .expect("worker runs");
                }));
            }
        }
    }

    fn worker_config(&self, extra: &[&str]) -> workers::WorkerConfig {
        let mut argv = vec!["worker".to_string()];
        argv.extend(self.worker_args(extra));
        WorkerFlags::try_parse_from(argv)
            .expect("worker flags parse")
            .config
    }

    /// Starts a worker inside the test process, on a pool of the test's choosing.
    pub fn start_worker_on(&mut self, pool: PgPool, extra: &[&str]) {
        let config = self.worker_config(extra);
        let (shutdown, queue) = (self.shutdown.clone(), self.queue.clone());
        self.tasks.push(tokio::spawn(async move {
            let db = Db::Postgres(pool).store(&queue).await;
            workers::run(config, db, shutdown)
                .await
                .expect("worker runs");
        }));
    }

    /// The environment that points a `berth` process at this test's queue.
    pub fn queue_env(&self) -> Vec<(&'static str, String)> {
        match &self.queue {
            QueueSettings::Postgres => vec![("BERTH_QUEUE", "postgres".into())],
            QueueSettings::Nats(nats) => vec![
                ("BERTH_QUEUE", "nats".into()),
                ("BERTH_NATS_URL", nats.url.clone()),
                ("BERTH_NATS_STREAM", nats.stream.clone()),
                ("BERTH_NATS_ACK_WAIT", nats.ack_wait.as_secs().to_string()),
                ("BERTH_NATS_MAX_DELIVER", nats.max_deliver.to_string()),
            ],
        }
    }

    /// Starts a scheduler inside the test process; cancel the token to stop it
    /// (it also stops with the environment).
    pub fn start_scheduler(&mut self, flags: &[&str]) -> CancellationToken {
        let mut argv = vec!["scheduler"];
        argv.extend_from_slice(flags);
        let config = SchedulerFlags::try_parse_from(argv)
            .expect("scheduler flags parse")
            .config;
        let queue = self.queue.clone();
        let stop = self.shutdown.child_token();
        let token = stop.clone();
        let db = self.db.clone();
        self.tasks.push(tokio::spawn(async move {
            scheduler::run(config, db.store(&queue).await, token)
                .await
                .expect("scheduler runs");
        }));
        stop
    }

    /// Starts `berth worker` as a real process; returns its index for `kill_worker`.
    pub fn start_worker_process(&mut self, extra: &[&str]) -> usize {
        let child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("worker")
            .args(self.worker_args(extra))
            .envs(self.queue_env())
            .env("BERTH_DATABASE_URL", &self.db_url)
            .env(
                "BERTH_LOG",
                std::env::var("BERTH_TEST_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start berth worker");
        self.children.push(child);
        self.children.len() - 1
    }

    /// Starts `berth scheduler` as a real process; returns its index.
    pub fn start_scheduler_process(&mut self, flags: &[&str]) -> usize {
        let child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("scheduler")
            .args(flags)
            .envs(self.queue_env())
            .env("BERTH_DATABASE_URL", &self.db_url)
            .env("BERTH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start berth scheduler");
        self.children.push(child);
        self.children.len() - 1
    }

    /// Sends SIGTERM to a worker process and waits up to `within` for it to exit.
    pub async fn terminate_worker(
        &mut self,
        index: usize,
        within: Duration,
    ) -> std::process::ExitStatus {
        let child = &mut self.children[index];
        let pid = child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the worker did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts `berth api` as a real process on a free port; returns its index.
    /// Later calls of this environment go to it.
    pub async fn start_api_process(&mut self) -> usize {
        let allowed = format!("{TEST_IMAGE},{MISSING_IMAGE}");
        let (index, base) = self
            .start_serving(
                "api",
                &[
                    ("BERTH_ADMIN_TOKEN", TOKEN),
                    ("BERTH_ALLOWED_IMAGES", allowed.as_str()),
                    // As the in-process API: tests register their users.
                    ("BERTH_ALLOW_REGISTRATION", "true"),
                    ("BERTH_REGISTRATIONS_PER_ADDRESS", "1000"),
                ],
            )
            .await;
        self.base = base;
        index
    }

    /// Starts `berth proxy` as a real process on this test's store; returns its
    /// index (for `kill_worker`) and base URL.
    pub async fn start_proxy_process(&mut self) -> (usize, String) {
        self.start_serving("proxy", &[]).await
    }

    /// A `berth` role that serves HTTP, as a process on a free port of its own,
    /// on this test's store and signing key; its index and base URL once ready.
    async fn start_serving(&mut self, role: &str, env: &[(&str, &str)]) -> (usize, String) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg(role)
            .envs(self.queue_env())
            .env("BERTH_DATABASE_URL", &self.db_url)
            .env("BERTH_LISTEN", format!("127.0.0.1:{port}"))
            .env("BERTH_JWT_PRIVATE_KEY", &self.jwt_pem)
            .env("BERTH_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start berth {role}: {e}"));
        self.children.push(child);
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.http.get(format!("{base}/ready")).send().await.is_err() {
            assert!(Instant::now() < deadline, "berth {role} did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (self.children.len() - 1, base)
    }

    /// Which of the started processes have exited, and how.
    pub fn process_states(&mut self) -> Vec<Option<std::process::ExitStatus>> {
        self.children
            .iter_mut()
            .map(|c| c.try_wait().ok().flatten())
            .collect()
    }

    /// `kill -9` of a worker process.
    pub fn kill_worker(&mut self, index: usize) {
        let child = &mut self.children[index];
        child.kill().expect("kill worker");
        child.wait().expect("reap worker");
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        self.call_with(method, path, body, Some(TOKEN)).await
    }

    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        let response = request.send().await.expect("api answers");
        let status = response.status();
        let text = response.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// Logs in and returns the access token.
    pub async fn login(&self, user: &str, password: &str) -> String {
        let body = serde_json::json!({ "username": user, "password": password }).to_string();
        let (status, answer) = self
            .call_with(Method::POST, "/api/v1/auth/login", Some(&body), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer["access_token"]
            .as_str()
            .expect("an access token")
            .to_owned()
    }

    /// Registers an account and logs it in.
    pub async fn register(&self, user: &str, password: &str) -> String {
        let body = serde_json::json!({ "username": user, "password": password }).to_string();
        let (status, answer) = self
            .call_with(Method::POST, "/api/v1/auth/register", Some(&body), None)
            .await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
        self.login(user, password).await
    }

    /// Starts another `berth api` on this test's store, as a restart does (the
    /// bootstrap runs at its start); later calls go to it.
    pub async fn start_another_api(&mut self) {
        let (base, task) = serve_api(&self.db, &self.queue, &self.jwt_pem, &[]).await;
        self.base = base;
        self.tasks.push(task);
    }

    /// Full responses, for tests that look at headers.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub async fn create_user(&self, name: &str) {
        let (status, body) = self
            .call(Method::POST, &format!("/api/v1/users/{name}"), None)
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    /// Polls a server until `done` holds, or fails the test at the deadline.
    pub async fn wait_server(
        &self,
        path: &str,
        within: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let (status, body) = self.call(Method::GET, path, None).await;
            if status == StatusCode::OK && done(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{path} never got there; last answer {status}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_job(&self, id: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let (_, job) = self
                .call(Method::GET, &format!("/api/v1/jobs/{id}"), None)
                .await;
            let state = job["state"].as_str().unwrap_or_default();
            if ["succeeded", "failed", "cancelled"].contains(&state) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} did not finish: {job}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Containers of this test (running or not), by name.
    pub fn containers(&self) -> Vec<String> {
        docker_lines(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=berth.instance={}", self.id),
            "--format",
            "{{.Names}}",
        ])
    }

    pub fn volumes(&self) -> Vec<String> {
        docker_lines(&[
            "volume",
            "ls",
            "--filter",
            &format!("label=berth.instance={}", self.id),
            "--format",
            "{{.Name}}",
        ])
    }

    pub fn inspect(&self, container: &str) -> Value {
        let out = Command::new("docker")
            .args(["inspect", container])
            .output()
            .expect("docker inspect");
        assert!(out.status.success(), "no container {container}");
        let all: Value = serde_json::from_slice(&out.stdout).unwrap();
        all[0].clone()
    }

    /// A variable of a container's environment, as the worker set it.
    pub fn container_env(&self, container: &str, name: &str) -> String {
        let prefix = format!("{name}=");
        self.inspect(container)["Config"]["Env"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .find_map(|v| v.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("{container} has no {name}"))
            .to_owned()
    }

    /// A service token with `scopes`, made by the bootstrap admin.
    pub async fn service_token(&self, scopes: &[&str]) -> String {
        let body =
            serde_json::json!({ "name": format!("test-{}", scopes.join("-")), "scopes": scopes });
        let (status, created) = self
            .call(
                Method::POST,
                "/api/v1/admin/tokens",
                Some(&body.to_string()),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created["token"].as_str().unwrap().to_owned()
    }

    /// The most spawn slots ever held at one moment, from the record of every spawn.
    pub async fn peak_spawns_in_flight(&self) -> i64 {
        const EDGES: &str = "select started_at, cast(1 as bigint) from spawn_attempts \
             union all select ended_at, cast(-1 as bigint) from spawn_attempts where ended_at is not null";
        let edges: Vec<(chrono::DateTime<chrono::Utc>, i64)> = match &self.db {
            Db::Postgres(pool) => sqlx::query_as(EDGES).fetch_all(pool).await,
            Db::Sqlite(store) => sqlx::query_as(EDGES).fetch_all(store.pool()).await,
        }
        .unwrap();
        let mut edges = edges;
        // At equal times an end comes before a start: the slot was free first.
        edges.sort_by_key(|(at, delta)| (*at, *delta));
        let (mut now, mut peak) = (0, 0);
        for (_, delta) in edges {
            now += delta;
            peak = peak.max(now);
        }
        peak
    }

    /// Creates `user`, requests its default server and returns once the spawn has
    /// made its container (mid-spawn, when the server starts slowly): the server's
    /// path and its job's path.
    pub async fn spawn_until_container(&self, user: &str) -> (String, String) {
        self.create_user(user).await;
        let path = format!("/api/v1/users/{user}/server");
        let (status, spawn) = self.call(Method::POST, &path, None).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{spawn}");
        let job_path = format!("/api/v1/jobs/{}", spawn["job_id"].as_str().unwrap());
        wait_for(
            "the spawn to start its container",
            Duration::from_secs(20),
            async || !self.containers().is_empty(),
        )
        .await;
        (path, job_path)
    }

    pub async fn running_servers(&self) -> i64 {
        self.count("select count(*) from servers where state = 'running'")
            .await
    }

    /// Rows of a query that reads the same on Postgres and SQLite.
    pub async fn rows<T>(&self, sql: &'static str) -> Vec<T>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
            + Send
            + Unpin,
    {
        match &self.db {
            Db::Postgres(pool) => sqlx::query_as::<_, T>(sql).fetch_all(pool).await,
            Db::Sqlite(store) => sqlx::query_as::<_, T>(sql).fetch_all(store.pool()).await,
        }
        .unwrap()
    }

    /// Runs a statement that reads the same on Postgres and SQLite, with one
    /// time bound as `$1`; the rows it changed.
    pub async fn execute_at(&self, sql: &'static str, at: chrono::DateTime<chrono::Utc>) -> u64 {
        match &self.db {
            Db::Postgres(pool) => sqlx::query(sql)
                .bind(at)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
            Db::Sqlite(store) => sqlx::query(sql)
                .bind(at)
                .execute(store.pool())
                .await
                .map(|r| r.rows_affected()),
        }
        .unwrap()
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        match &self.db {
            Db::Postgres(pool) => sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await,
            Db::Sqlite(store) => {
                sqlx::query_scalar::<_, i64>(sql)
                    .fetch_one(store.pool())
                    .await
            }
        }
        .unwrap()
    }
}

/// Polls `check` every 100 ms until it holds, or fails the test at the deadline.
pub async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the test's JetStream stream holds now.
#[derive(Debug)]
pub struct StreamState {
    pub messages: u64,
    pub last_sequence: u64,
}

pub async fn stream_state(env: &TestEnv) -> StreamState {
    let QueueSettings::Nats(nats) = &env.queue else {
        panic!("not a NATS test");
    };
    let client = async_nats::connect(nats.url.as_str()).await.expect("nats");
    let mut stream = async_nats::jetstream::new(client)
        .get_stream(&nats.stream)
        .await
        .expect("the stream exists");
    let info = stream.info().await.expect("stream info");
    StreamState {
        messages: info.state.messages,
        last_sequence: info.state.last_sequence,
    }
}

/// A nats-server of a test's own, which it may kill and restart: JetStream on a
/// free port, its store in a directory removed on drop.
pub struct OwnNats {
    pub url: String,
    port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl OwnNats {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir =
            std::env::temp_dir().join(format!("berth-nats-{port}-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nats = Self {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            dir,
            child: None,
        };
        nats.restart().await;
        nats
    }

    /// `kill -9` of the server.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill();
        let binary = std::env::var("BERTH_TEST_NATS_SERVER")
            .unwrap_or_else(|_| "/usr/sbin/nats-server".into());
        let child = Command::new(binary)
            .args(["--jetstream", "--addr", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--store_dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server (BERTH_TEST_NATS_SERVER)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "nats-server did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Postgres cluster of a test's own, which it may restart: initialised in a
/// temporary directory, listening on a free port of 127.0.0.1, run as the
/// `postgres` OS user when the tests run as root (Postgres refuses root).
pub struct OwnPostgres {
    /// A superuser URL (trust authentication on loopback).
    pub admin_url: String,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
}

impl OwnPostgres {
    pub async fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (ops/test.sh installs it)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("postgres").exists())
            .max_by_key(|bin| {
                bin.parent()
                    .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
                    .unwrap_or(0)
            })
            .expect("a PostgreSQL server binary");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir =
            std::env::temp_dir().join(format!("berth-pg-{port}-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let pg = Self {
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            bin,
        };
        if pg.as_root() {
            let owned = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&pg.dir)
                .status()
                .expect("chown");
            assert!(owned.success(), "the postgres OS user exists");
        }
        pg.run(
            "initdb",
            &["-U", "postgres", "--auth=trust", "--no-sync", "-D", "data"],
        );
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off",
            pg.dir.display()
        );
        pg.run(
            "pg_ctl",
            &["-D", "data", "-l", "log", "-w", "-o", &options, "start"],
        );
        pg
    }

    /// `pg_ctl restart -m fast`: every session ends, as in a real restart.
    pub fn restart(&self) {
        self.run(
            "pg_ctl",
            &["-D", "data", "-l", "log", "-w", "-m", "fast", "restart"],
        );
    }

    fn as_root(&self) -> bool {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
    }

    /// A PostgreSQL tool, run in the cluster's directory as the cluster's owner.
    fn tool(&self, tool: &str) -> Command {
        let binary = self.bin.join(tool);
        let mut command = if self.as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(binary);
            c
        } else {
            Command::new(binary)
        };
        command.current_dir(&self.dir);
        command
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self
            .tool(tool)
            .args(args)
            .output()
            .expect("run a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = self
            .tool("pg_ctl")
            .args(["-D", "data", "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The data directory of a test on the embedded store.
pub fn sqlite_dir(id: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("sqlite-{id}"))
}

fn docker_lines(args: &[&str]) -> Vec<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker cli");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for task in &self.tasks {
            task.abort();
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let containers = self.containers();
        if !containers.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&containers)
                .output();
        }
        let volumes = self.volumes();
        if !volumes.is_empty() {
            let _ = Command::new("docker")
                .args(["volume", "rm", "-f"])
                .args(&volumes)
                .output();
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network()])
            .output();
        let stream = match &self.queue {
            QueueSettings::Nats(nats) => Some(nats.clone()),
            QueueSettings::Postgres => None,
        };
        if let Db::Sqlite(_) = &self.db {
            let _ = std::fs::remove_dir_all(sqlite_dir(&self.id));
            return;
        }
        // The runtime may be gone by now: drop the database from a thread of its own.
        let admin_url = admin_database_url();
        let db = self.db_name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Some(nats) = stream
                    && let Ok(client) = async_nats::connect(nats.url.as_str()).await
                {
                    let _ = async_nats::jetstream::new(client)
                        .delete_stream(&nats.stream)
                        .await;
                }
                if let Ok(admin) = PgPool::connect(&admin_url).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "drop database if exists {db} with (force)"
                    )))
                    .execute(&admin)
                    .await;
                }
            });
        })
        .join();
    }
}
