//! What a worker needs from a container engine.

use std::{future::Future, pin::Pin};

use async_trait::async_trait;

/// Everything a spawner needs to start one server.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub server_id: i64,
    pub job_id: uuid::Uuid,
    pub user: schema::UserName,
    pub server: schema::ServerName,
    /// `None` uses the configured default image.
    pub image: Option<String>,
    /// The server's own API token, handed to it in its environment.
    pub token: String,
    /// The secret the server accepts from the proxy only (`JUPYTER_TOKEN`).
    pub proxy_token: String,
    /// The profile the server was requested with, as it was then; its settings
    /// win over the worker's configuration.
    pub profile: Option<schema::profiles::Profile>,
}

impl SpawnSpec {
    /// The prefix the proxy serves the server under, which it serves under too.
    pub fn base_url(&self) -> String {
        schema::server_path(&self.user, &self.server)
    }

    /// A command template with `{port}`, `{user}`, `{server}` and `{base_url}`
    /// filled in (names are DNS labels and the rest numbers and slashes: nothing
    /// needs quoting).
    pub fn command(&self, template: &str, port: u16) -> String {
        template
            .replace("{port}", &port.to_string())
            .replace("{user}", self.user.as_str())
            .replace("{server}", self.server.as_str())
            .replace("{base_url}", &self.base_url())
    }

    /// What every server is told, whichever spawner starts it: who it is for, where
    /// it is served and listens, how to reach the API, and the secrets. Jupyter
    /// reads `JUPYTER_TOKEN` as the token it requires (the proxy sends it), and
    /// images built for JupyterHub read their prefix from
    /// `JUPYTERHUB_SERVICE_PREFIX`. The configured `BERTH_SERVER_ENV` comes next,
    /// then the profile's environment (which may not name Berth's own variables).
    pub fn environment(&self, port: u16, api_url: &str, extra: &[String]) -> Vec<(String, String)> {
        let base = self.base_url();
        let mut env: Vec<(String, String)> = [
            ("BERTH_USER", self.user.to_string()),
            ("BERTH_SERVER_NAME", self.server.to_string()),
            ("BERTH_SERVER_PORT", port.to_string()),
            ("BERTH_BASE_URL", base.clone()),
            ("JUPYTERHUB_SERVICE_PREFIX", base),
            ("BERTH_API_URL", api_url.to_owned()),
            ("BERTH_API_TOKEN", self.token.clone()),
            ("BERTH_PROXY_TOKEN", self.proxy_token.clone()),
            ("JUPYTER_TOKEN", self.proxy_token.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        env.extend(
            extra
                .iter()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        if let Some(profile) = &self.profile {
            env.extend(profile.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        env
    }

    /// Seconds the server may take to answer: the profile's, else `configured`.
    pub fn start_timeout(&self, configured: u64) -> u64 {
        self.profile
            .as_ref()
            .and_then(|p| p.start_timeout)
            .unwrap_or(configured)
    }

    /// The command template: the profile's, else `configured`.
    pub fn command_template<'a>(&'a self, configured: Option<&'a str>) -> Option<&'a str> {
        self.profile
            .as_ref()
            .and_then(|p| p.command.as_deref())
            .or(configured)
    }
}

#[derive(Debug, Clone)]
pub struct Spawned {
    pub container_id: String,
    pub url: String,
    /// Bytes of memory and CPUs the server may use, where the spawner sets them.
    pub mem_limit: Option<i64>,
    pub cpu_limit: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("image {image}: {reason}")]
    Image { image: String, reason: String },
    #[error("the server exited before it was ready ({0})")]
    Exited(String),
    #[error("the server did not answer HTTP on port {port} within {secs} s")]
    Timeout { port: u16, secs: u64 },
    #[error("the spawn was abandoned: a stop was requested")]
    Abandoned,
    #[error("container engine: {0}")]
    Engine(String),
    /// The engine cannot provide the devices the server's profile asks for.
    #[error("the engine cannot provide the profile's devices: {0}")]
    Devices(String),
    /// The engine holds a container or volume of the server's name that this
    /// deployment did not create: it is left alone, and the spawn fails.
    #[error("{0}")]
    Taken(String),
}

/// Told each step of a spawn (a percentage and what happens); never blocks.
pub type Progress<'a> = &'a (dyn Fn(i16, String) + Send + Sync);

/// Asked while a spawn waits for readiness: is the server still wanted?
pub type StillWanted<'a> =
    Box<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> + Send + Sync + 'a>;

/// How often a starting server is probed, and asked whether it is still wanted.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
const RECHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Waits until the server answers HTTP on `host:port`, `exited` (asked every
/// `exit_check`) reports why it ended, the spawn is no longer wanted, or
/// `timeout_secs` pass. Shared by every spawner.
pub(crate) async fn wait_ready<F, Fut>(
    host: &str,
    port: u16,
    timeout_secs: u64,
    still_wanted: &StillWanted<'_>,
    exit_check: std::time::Duration,
    mut exited: F,
) -> Result<(), SpawnError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<String>, SpawnError>>,
{
    use tokio::time::{Instant, sleep};
    let deadline = Instant::now() + std::time::Duration::from_secs(timeout_secs);
    let mut next_check = Instant::now() + RECHECK_EVERY;
    let mut next_exit_check = Instant::now() + exit_check;
    loop {
        if probe_http(host, port).await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(SpawnError::Timeout {
                port,
                secs: timeout_secs,
            });
        }
        if Instant::now() >= next_check {
            next_check = Instant::now() + RECHECK_EVERY;
            if !still_wanted().await {
                return Err(SpawnError::Abandoned);
            }
        }
        if Instant::now() >= next_exit_check {
            next_exit_check = Instant::now() + exit_check;
            if let Some(why) = exited().await? {
                return Err(SpawnError::Exited(why));
            }
        }
        sleep(PROBE_EVERY).await;
    }
}

impl SpawnError {
    /// Worth another try: the engine was busy or unreachable. A missing image, a
    /// server that exits or never answers will not do better the next time.
    pub fn is_transient(&self) -> bool {
        matches!(self, SpawnError::Engine(_))
    }
}

/// A container that carries this deployment's labels.
#[derive(Debug, Clone)]
pub struct ManagedContainer {
    pub id: String,
    pub name: String,
    pub server_id: Option<i64>,
    pub running: bool,
    /// The exit status, for a container that is not running.
    pub exit_code: Option<i64>,
}

#[async_trait]
pub trait Spawner: Send + Sync + 'static {
    /// What it is, as recorded on the servers it starts: `docker` or `process`.
    fn kind(&self) -> &'static str;

    /// Starts the server and waits until it answers HTTP. Idempotent: whatever a
    /// previous attempt left under the same name is replaced, never doubled.
    async fn spawn(
        &self,
        spec: &SpawnSpec,
        still_wanted: StillWanted<'_>,
        progress: Progress<'_>,
    ) -> Result<Spawned, SpawnError>;

    /// Stops and removes the server's container; a missing one is not an error.
    async fn stop(
        &self,
        user: &schema::UserName,
        server: &schema::ServerName,
    ) -> Result<(), SpawnError>;

    /// Removes every container of the user, and the user's volume.
    async fn remove_user(&self, user: &schema::UserName) -> Result<(), SpawnError>;

    /// Every container of this deployment, running or not, for reconciliation.
    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, SpawnError>;

    /// A container's state now: `None` when it is gone, else whether it runs and,
    /// if not, how it exited.
    async fn container_state(
        &self,
        container_id: &str,
    ) -> Result<Option<(bool, Option<i64>)>, SpawnError>;

    /// Removes one container by id, whatever it runs; a missing one is not an error.
    async fn remove(&self, container_id: &str) -> Result<(), SpawnError>;
}

/// One HTTP request; any HTTP answer, whatever its status, means the server is up.
/// `HEAD`, and the answer read to its end: a probe that hung up mid-body made
/// servers log a reset connection (Python's `http.server` printed a traceback into
/// the server's log on every spawn).
async fn probe_http(ip: &str, port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
        let request =
            format!("HEAD / HTTP/1.0\r\nHost: {ip}:{port}\r\nUser-Agent: berth-probe\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 5];
        stream.read_exact(&mut head).await.ok()?;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            stream.read_to_end(&mut rest),
        )
        .await;
        Some(&head == b"HTTP/")
    };
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(1), attempt).await,
        Ok(Some(true))
    )
}
