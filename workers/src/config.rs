//! Worker settings: every one a flag and an environment variable.

use std::time::Duration;

/// When a worker pulls the server image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PullPolicy {
    /// Pull only when the engine does not have the image.
    IfNotPresent,
    /// Pull before every spawn.
    Always,
    /// Never pull; a missing image fails the spawn.
    Never,
}

#[derive(Debug, Clone, clap::Args)]
pub struct WorkerConfig {
    /// Jobs one worker process runs at once, per queue (spawn, control).
    #[arg(long, env = "BERTH_WORKER_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,

    /// This worker's name in job records; default `{hostname}-{pid}`.
    #[arg(long, env = "BERTH_WORKER_NAME")]
    pub worker_name: Option<String>,

    /// Milliseconds between polls of the queue, besides the wake-ups NOTIFY gives
    /// for new jobs; it bounds how long a retried or taken-over job waits.
    #[arg(long, env = "BERTH_QUEUE_POLL_MS", default_value_t = 250)]
    pub poll_interval_ms: u64,

    /// Seconds between a worker's heartbeats.
    #[arg(long, env = "BERTH_WORKER_HEARTBEAT", default_value_t = 5)]
    pub heartbeat: u64,

    /// Heartbeats a worker may miss before others take its jobs over; a dead
    /// worker's spawn resumes elsewhere within heartbeat × (this + 1) seconds.
    #[arg(long, env = "BERTH_WORKER_MISSED_HEARTBEATS", default_value_t = 3)]
    pub missed_heartbeats: usize,

    /// Seconds a stopping worker gives its jobs in flight to finish.
    #[arg(long, env = "BERTH_SHUTDOWN_GRACE", default_value_t = 30)]
    pub shutdown_grace: u64,

    /// Seconds between reconciliations of containers against the database.
    #[arg(long, env = "BERTH_RECONCILE_INTERVAL", default_value_t = 60)]
    pub reconcile_interval: u64,

    /// Tries of a job whose failures are transient (engine busy) before it fails.
    #[arg(long, env = "BERTH_JOB_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,

    #[command(flatten)]
    pub docker: DockerConfig,

    #[command(flatten)]
    pub process: ProcessConfig,
}

/// What starts user servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SpawnerKind {
    /// Containers on the Docker engine.
    Docker,
    /// Local child processes running `BERTH_SERVER_COMMAND` (no engine needed).
    Process,
    /// Docker when the engine answers at start-up, else local processes.
    Auto,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ProcessConfig {
    /// What starts user servers: `docker`, `process` or `auto`; default `docker`
    /// (`auto` for `berth up`).
    #[arg(long, env = "BERTH_SPAWNER", value_enum)]
    pub spawner: Option<SpawnerKind>,

    /// The command of a local-process server, run by `sh -c` in the user's working
    /// directory; `{port}`, `{user}`, `{server}`, `{base_url}` (the prefix the
    /// proxy serves it under) and `{berth}` (this program) are substituted. The
    /// default serves the working directory (`berth sample-server`); Jupyter:
    /// `jupyter lab --ServerApp.port={port} --ServerApp.base_url={base_url}`
    /// (it reads its token from `JUPYTER_TOKEN`).
    #[arg(
        long,
        env = "BERTH_SERVER_COMMAND",
        default_value = "{berth} sample-server"
    )]
    pub server_command: String,

    /// Where local-process servers keep their logs and pid files; and, for `berth
    /// up` with no database, the embedded database (`berth.db`), its signing key and
    /// the admin's password. Made 0700: servers never see into it.
    #[arg(long, env = "BERTH_DATA_DIR", default_value = "berth-data")]
    pub data_dir: std::path::PathBuf,

    /// Where local-process servers' users have their working directories
    /// (`{dir}/{instance}/{user}`): apart from the data directory, so that a
    /// server's code does not start next to Berth's files.
    #[arg(long, env = "BERTH_HOMES_DIR", default_value = "berth-homes")]
    pub homes_dir: std::path::PathBuf,

    /// The OS user local-process servers run as (`name`, `uid`, `name:group` or
    /// `uid:gid`); needs Berth to run as root. Unset: Berth's own user, which can
    /// read Berth's files: for one person, not a class (the log and the banner say so).
    #[arg(long, env = "BERTH_PROCESS_USER")]
    pub process_user: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DockerConfig {
    /// Image of user servers when a spawn names none.
    #[arg(
        long,
        env = "BERTH_IMAGE",
        default_value = schema::DEFAULT_IMAGE
    )]
    pub image: String,

    /// When to pull the image.
    #[arg(
        long,
        env = "BERTH_PULL_POLICY",
        value_enum,
        default_value = "if-not-present"
    )]
    pub pull_policy: PullPolicy,

    /// Port the server listens on inside its container.
    #[arg(long, env = "BERTH_SERVER_PORT", default_value_t = 8888)]
    pub server_port: u16,

    /// Memory limit per server (bytes, or with a K, M, G or T suffix, powers of 1024).
    #[arg(long, env = "BERTH_MEM_LIMIT", default_value = "2G", value_parser = parse_bytes)]
    pub mem_limit: i64,

    /// CPU limit per server, in cores.
    #[arg(long, env = "BERTH_CPU_LIMIT", default_value_t = 1.0, value_parser = parse_cpus)]
    pub cpu_limit: f64,

    /// Most processes one server may run.
    #[arg(long, env = "BERTH_PIDS_LIMIT", default_value_t = 1024)]
    pub pids_limit: i64,

    /// Docker network of the servers; created when missing.
    #[arg(long, env = "BERTH_NETWORK", default_value = "berth")]
    pub network: String,

    /// Where the user's volume `berth-user-{user}` is mounted in the container.
    #[arg(long, env = "BERTH_VOLUME_PATH", default_value = "/home/jovyan/work")]
    pub volume_path: String,

    /// The container's command instead of the image's, split at white space, with
    /// `{port}`, `{user}`, `{server}` and `{base_url}` filled in. A Jupyter image
    /// of jupyter/docker-stacks: `start-notebook.py --ServerApp.base_url={base_url}`
    /// (it takes its token from `JUPYTER_TOKEN`, which Berth sets). Default: the image's.
    #[arg(long, env = "BERTH_CONTAINER_COMMAND")]
    pub container_command: Option<String>,

    /// User the server runs as (`uid[:gid]` or a name); default the image's own.
    #[arg(long, env = "BERTH_CONTAINER_USER")]
    pub container_user: Option<String>,

    /// Seconds until a spawn that is not answering HTTP fails.
    #[arg(long, env = "BERTH_START_TIMEOUT", default_value_t = 120)]
    pub start_timeout: u64,

    /// Seconds a stopping server gets between SIGTERM and SIGKILL.
    #[arg(long, env = "BERTH_STOP_TIMEOUT", default_value_t = 10)]
    pub stop_timeout: u64,

    /// Value of the `berth.instance` label: separates deployments sharing one engine.
    /// Docker names carry it too, except the default's (`berth-{user}`).
    #[arg(long, env = "BERTH_INSTANCE", default_value = schema::DEFAULT_INSTANCE,
          value_parser = parse_instance)]
    pub instance: String,

    /// Extra environment for every server, as `KEY=VALUE` pairs separated by commas.
    #[arg(long, env = "BERTH_SERVER_ENV", value_delimiter = ',', value_parser = parse_env_pair)]
    pub server_env: Vec<String>,

    /// The API's address as servers reach it, given to them as `BERTH_API_URL`
    /// (activity reports, SSO checks). Default: the API's port (`BERTH_LISTEN`) on
    /// loopback for local processes, and on the Docker network's gateway (the
    /// host) for containers, which answers only when the API listens on an
    /// address containers reach (e.g. `0.0.0.0:8080`).
    #[arg(long, env = "BERTH_PUBLIC_API_URL")]
    pub public_api_url: Option<String>,

    /// The API's listen address, from which servers' default `BERTH_API_URL` is made.
    #[arg(
        long = "api-listen",
        env = "BERTH_LISTEN",
        default_value = "127.0.0.1:8080",
        hide = true
    )]
    pub api_listen: std::net::SocketAddr,
}

impl DockerConfig {
    /// `BERTH_PUBLIC_API_URL`, else the API's port on `host`.
    pub fn api_url_on(&self, host: &str) -> String {
        self.public_api_url
            .clone()
            .unwrap_or_else(|| format!("http://{host}:{}/api/v1", self.api_listen.port()))
    }

    pub fn start_timeout(&self) -> Duration {
        Duration::from_secs(self.start_timeout)
    }

    pub fn nano_cpus(&self) -> i64 {
        (self.cpu_limit * 1e9).round() as i64
    }
}

/// A `BERTH_INSTANCE`: a lowercase DNS label (it stands in Docker names).
fn parse_instance(value: &str) -> Result<String, String> {
    schema::check_instance(value).map_err(|e| e.to_string())?;
    Ok(value.to_owned())
}

/// `2G`, `512M`, `1024k` or plain bytes.
pub fn parse_bytes(value: &str) -> Result<i64, String> {
    schema::profiles::parse_bytes(value)
}

fn parse_cpus(value: &str) -> Result<f64, String> {
    let cpus: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number of cores"))?;
    schema::profiles::check_cpus(cpus)
}

fn parse_env_pair(value: &str) -> Result<String, String> {
    match value.split_once('=') {
        Some((key, _)) if !key.is_empty() => Ok(value.to_owned()),
        _ => Err(format!("{value:?} is not KEY=VALUE")),
    }
}
