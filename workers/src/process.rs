//! The local-process spawner (`BERTH_SPAWNER=process`): each server is a child
//! process running `BERTH_SERVER_COMMAND` on a free loopback port, in its user's
//! working directory `{homes}/{instance}/{user}` (kept across stops like a volume,
//! removed with the user), its output appended to a log under `{data}/{instance}/logs`
//! (kept across stops, shown by the API, removed with the user). The data directory
//! is 0700; with `BERTH_PROCESS_USER` (Berth running as root) servers run as that
//! user and cannot read it. For a laptop with no container engine, or a machine
//! whose users are trusted: processes get no memory or CPU limits.
//!
//! What a restarted worker needs to find its servers again lives on disk, one
//! directory per server under `{data}/{instance}/run/{container name}`: `pid` (the
//! process id and its start time, so a reused pid is never mistaken for it),
//! `server-id`, and `exit` once a child of this worker has exited. A server
//! is started in its own process group and stopped with SIGTERM to the group, then
//! SIGKILL after the stop timeout.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use schema::{ServerName, UserName, container_name};
use tokio::{
    process::Command,
    time::{Instant, sleep},
};

use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};

use crate::{
    config::{DockerConfig, ProcessConfig},
    os_user::OsUser,
    spawner::{
        ManagedContainer, Progress, SpawnError, SpawnSpec, Spawned, Spawner, StillWanted,
        wait_ready,
    },
};

/// A process's exit is a cheap look at /proc: checked at every probe.
const EXIT_CHECK_EVERY: Duration = Duration::from_millis(100);

pub struct ProcessSpawner {
    config: Arc<DockerConfig>,
    command: String,
    root: PathBuf,
    /// Users' working directories.
    homes: PathBuf,
    /// Who servers run as; `None`: Berth's own user.
    user: Option<OsUser>,
    /// This program's path, quoted for `sh` (`{berth}` in the command).
    berth: String,
}

/// A running (or once running) server process: its id and the start time the
/// kernel gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pid {
    pid: u32,
    started: u64,
}

impl Pid {
    fn id(self) -> String {
        format!("proc-{}-{}", self.pid, self.started)
    }

    fn parse_id(id: &str) -> Option<Self> {
        let rest = id.strip_prefix("proc-")?;
        let (pid, started) = rest.split_once('-')?;
        Some(Self {
            pid: pid.parse().ok()?,
            started: started.parse().ok()?,
        })
    }

    /// The start time of `pid` now, unless it is gone or a zombie.
    fn current(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command (which may hold spaces) in parentheses.
        let after = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        if fields.first() == Some(&"Z") {
            return None;
        }
        Some(Self {
            pid,
            started: fields.get(19)?.parse().ok()?,
        })
    }

    fn alive(self) -> bool {
        Self::current(self.pid) == Some(self)
    }
}

impl ProcessSpawner {
    pub fn new(config: Arc<DockerConfig>, process: &ProcessConfig) -> Result<Self, SpawnError> {
        let io = |path: &Path, e: std::io::Error| {
            SpawnError::Engine(format!("preparing {}: {e}", path.display()))
        };
        let root = process.data_dir.join(&config.instance);
        for dir in ["run", "logs"] {
            std::fs::create_dir_all(root.join(dir)).map_err(|e| io(&root.join(dir), e))?;
        }
        // Berth's own: no server (as another user) sees into it.
        private(&process.data_dir).map_err(|e| io(&process.data_dir, e))?;
        let homes = std::path::absolute(process.homes_dir.join(&config.instance))
            .map_err(|e| io(&process.homes_dir, e))?;
        std::fs::create_dir_all(&homes).map_err(|e| io(&homes, e))?;
        // Each server reaches its own home through here, and lists nothing.
        set_mode(&process.homes_dir, 0o711).map_err(|e| io(&process.homes_dir, e))?;
        set_mode(&homes, 0o711).map_err(|e| io(&homes, e))?;
        // Working directories of an earlier Berth, which kept them in the data directory.
        let old = root.join("home");
        if let Ok(entries) = std::fs::read_dir(&old) {
            for entry in entries.flatten() {
                let to = homes.join(entry.file_name());
                if !to.exists() {
                    std::fs::rename(entry.path(), &to).map_err(|e| io(&to, e))?;
                    tracing::info!(from = %entry.path().display(), to = %to.display(), "a user's working directory moved out of the data directory");
                }
            }
            let _ = std::fs::remove_dir(&old);
        }
        let user = process
            .process_user
            .as_deref()
            .map(OsUser::resolve)
            .transpose()
            .map_err(SpawnError::Engine)?;
        // This program, quoted for `sh`, for commands that run `berth sample-server`.
        let berth = std::env::current_exe()
            .map(|p| format!("'{}'", p.display().to_string().replace('\'', "'\\''")))
            .unwrap_or_else(|_| "berth".into());
        Ok(Self {
            config,
            command: process.server_command.clone(),
            root,
            homes,
            user,
            berth,
        })
    }

    /// How a local server reaches the API: on loopback unless the API listens on
    /// one address only.
    fn api_url(&self) -> String {
        let ip = self.config.api_listen.ip();
        let host = if ip.is_unspecified() {
            "127.0.0.1".to_owned()
        } else {
            ip.to_string()
        };
        self.config.api_url_on(&host)
    }

    fn run_dir(&self, name: &str) -> PathBuf {
        self.root.join("run").join(name)
    }

    fn log(&self, user: &UserName, server: &ServerName) -> PathBuf {
        schema::server_logs::path(&self.root.join("logs"), user, server)
    }

    fn home(&self, user: &UserName) -> PathBuf {
        self.homes.join(user.as_str())
    }

    fn read_pid(dir: &Path) -> Option<Pid> {
        let text = std::fs::read_to_string(dir.join("pid")).ok()?;
        let (pid, started) = text.trim().split_once(' ')?;
        Some(Pid {
            pid: pid.parse().ok()?,
            started: started.parse().ok()?,
        })
    }

    /// Stops the server of a run directory (if it runs) and removes the directory.
    async fn stop_dir(&self, dir: &Path) -> Result<(), SpawnError> {
        if let Some(pid) = Self::read_pid(dir) {
            terminate(pid, Duration::from_secs(self.config.stop_timeout)).await;
        }
        match tokio::fs::remove_dir_all(dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SpawnError::Engine(format!(
                "removing {}: {e}",
                dir.display()
            ))),
        }
    }

    fn run_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.root.join("run"))
            .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    async fn start(
        &self,
        spec: &SpawnSpec,
        dir: &Path,
        still_wanted: &StillWanted<'_>,
        progress: Progress<'_>,
    ) -> Result<Spawned, SpawnError> {
        let io = |what: &str, e: std::io::Error| SpawnError::Engine(format!("{what}: {e}"));
        let home = self.home(&spec.user);
        tokio::fs::create_dir_all(&home)
            .await
            .map_err(|e| io("creating the working directory", e))?;
        set_mode(&home, 0o700).map_err(|e| io("securing the working directory", e))?;
        if let Some(user) = self.user
            && std::fs::metadata(&home).is_ok_and(|m| m.uid() != user.uid)
        {
            user.own(&home)
                .map_err(|e| io("giving the working directory to BERTH_PROCESS_USER", e))?;
        }
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| io("creating the run directory", e))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| io("finding a free port", e))?
            .port();
        let template = spec
            .command_template(Some(&self.command))
            .unwrap_or(&self.command);
        let command = spec.command(template, port).replace("{berth}", &self.berth);
        progress(40, format!("starting `{command}` on port {port}"));
        let log_path = self.log(&spec.user, &spec.server);
        if let Some(parent) = log_path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("creating the log directory", e))?;
        }
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| io("opening the log", e))?;
        // Each run's output starts after a line of its own.
        std::io::Write::write_all(
            &mut log,
            format!(
                "--- {} berth: `{command}` on port {port}\n",
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )
            .as_bytes(),
        )
        .map_err(|e| io("writing the log", e))?;
        let stderr = log.try_clone().map_err(|e| io("opening the log", e))?;
        let mut child = Command::new("sh");
        if let Some(user) = self.user {
            // Dropping to this user also drops root's supplementary groups.
            child.uid(user.uid).gid(user.gid);
        }
        let mut child = child
            .arg("-c")
            .arg(&command)
            .current_dir(&home)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", &home)
            .envs(spec.environment(port, &self.api_url(), &self.config.server_env))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .spawn()
            .map_err(|e| SpawnError::Exited(format!("the command could not start: {e}")))?;
        let Some(pid) = child.id().and_then(Pid::current) else {
            let code = child.wait().await.ok().and_then(|s| s.code()).unwrap_or(-1);
            return Err(SpawnError::Exited(format!(
                "exit code {code}; last output: {}",
                tail(&log_path)
            )));
        };
        write_private(&dir.join("pid"), &format!("{} {}", pid.pid, pid.started))
            .and_then(|()| write_private(&dir.join("server-id"), &spec.server_id.to_string()))
            .map_err(|e| io("writing the pid file", e))?;
        // Reaps the child and keeps its exit status for whoever looks next.
        let exit_file = dir.join("exit");
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                let code = status.code().map_or(-1, i64::from);
                let _ = write_private(&exit_file, &code.to_string());
            }
        });
        progress(
            70,
            format!("waiting for the server to answer on port {port}"),
        );
        let timeout = spec.start_timeout(self.config.start_timeout);
        self.wait_ready(dir, &log_path, pid, port, timeout, still_wanted)
            .await?;
        Ok(Spawned {
            container_id: pid.id(),
            url: format!("http://127.0.0.1:{port}/"),
            mem_limit: None,
            cpu_limit: None,
        })
    }

    async fn wait_ready(
        &self,
        dir: &Path,
        log: &Path,
        pid: Pid,
        port: u16,
        timeout_secs: u64,
        still_wanted: &StillWanted<'_>,
    ) -> Result<(), SpawnError> {
        let exited = || async move {
            if pid.alive() {
                return Ok(None);
            }
            // The reaper writes the status a moment after the exit.
            sleep(Duration::from_millis(100)).await;
            let code = std::fs::read_to_string(dir.join("exit")).unwrap_or_default();
            Ok(Some(format!(
                "exit code {}; last output: {}",
                code.trim(),
                tail(log)
            )))
        };
        wait_ready(
            "127.0.0.1",
            port,
            timeout_secs,
            still_wanted,
            EXIT_CHECK_EVERY,
            exited,
        )
        .await
    }
}

/// The last lines of a log, for an error message.
fn tail(path: &Path) -> String {
    let text = schema::server_logs::tail(path, 8 * 1024).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    // This run's output: what follows its header line.
    let this_run = lines
        .iter()
        .rposition(|l| l.starts_with("--- ") && l.contains(" berth: "))
        .map_or(0, |i| i + 1);
    let lines = &lines[this_run..];
    let last = lines[lines.len().saturating_sub(10)..].join("\n");
    if last.trim().is_empty() {
        "none".into()
    } else {
        last.chars().take(2000).collect()
    }
}

/// SIGTERM to the server's process group, SIGKILL once `grace` has passed.
async fn terminate(pid: Pid, grace: Duration) {
    if !pid.alive() {
        return;
    }
    signal(pid, "TERM").await;
    let deadline = Instant::now() + grace;
    while pid.alive() && Instant::now() < deadline {
        sleep(Duration::from_millis(50)).await;
    }
    if pid.alive() {
        signal(pid, "KILL").await;
        while pid.alive() {
            sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Signals the process group through kill(1): no unsafe code, no extra crate.
async fn signal(pid: Pid, name: &str) {
    let group = format!("-{}", pid.pid);
    let sent = Command::new("kill")
        .args([&format!("-{name}"), "--", &group])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(e) = sent {
        tracing::warn!(pid = pid.pid, error = %e, "could not signal a server process");
    }
}

#[async_trait]
impl Spawner for ProcessSpawner {
    fn kind(&self) -> &'static str {
        "process"
    }

    async fn spawn(
        &self,
        spec: &SpawnSpec,
        still_wanted: StillWanted<'_>,
        progress: Progress<'_>,
    ) -> Result<Spawned, SpawnError> {
        let dir = self.run_dir(&container_name(&spec.user, &spec.server));
        // Whatever an interrupted attempt left is replaced, never doubled.
        self.stop_dir(&dir).await?;
        let started = self.start(spec, &dir, &still_wanted, progress).await;
        if started.is_err()
            && let Err(e) = self.stop_dir(&dir).await
        {
            tracing::warn!(dir = %dir.display(), error = %e, "could not clean up a failed spawn");
        }
        started
    }

    async fn stop(&self, user: &UserName, server: &ServerName) -> Result<(), SpawnError> {
        self.stop_dir(&self.run_dir(&container_name(user, server)))
            .await
    }

    async fn remove_user(&self, user: &UserName) -> Result<(), SpawnError> {
        let own = format!("berth-{user}");
        let prefix = format!("berth-{user}--");
        for dir in self.run_dirs() {
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name == own || name.starts_with(&prefix) {
                self.stop_dir(&dir).await?;
            }
        }
        let logs = schema::server_logs::user_dir(&self.root.join("logs"), user);
        for dir in [self.home(user), logs] {
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(SpawnError::Engine(format!(
                        "removing {}: {e}",
                        dir.display()
                    )));
                }
            }
        }
        Ok(())
    }

    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, SpawnError> {
        Ok(self
            .run_dirs()
            .into_iter()
            .filter_map(|dir| {
                let pid = Self::read_pid(&dir)?;
                let server_id = std::fs::read_to_string(dir.join("server-id"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                let running = pid.alive();
                let exit_code = std::fs::read_to_string(dir.join("exit"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                Some(ManagedContainer {
                    id: pid.id(),
                    name: dir.file_name()?.to_str()?.to_owned(),
                    server_id,
                    running,
                    exit_code: if running { None } else { exit_code },
                })
            })
            .collect())
    }

    async fn container_state(
        &self,
        container_id: &str,
    ) -> Result<Option<(bool, Option<i64>)>, SpawnError> {
        let Some(pid) = Pid::parse_id(container_id) else {
            return Ok(None);
        };
        if pid.alive() {
            return Ok(Some((true, None)));
        }
        let dir = self
            .run_dirs()
            .into_iter()
            .find(|d| Self::read_pid(d) == Some(pid));
        Ok(dir.map(|d| {
            let code = std::fs::read_to_string(d.join("exit"))
                .ok()
                .and_then(|s| s.trim().parse().ok());
            (false, code)
        }))
    }

    async fn remove(&self, container_id: &str) -> Result<(), SpawnError> {
        let Some(pid) = Pid::parse_id(container_id) else {
            return Ok(());
        };
        for dir in self.run_dirs() {
            if Self::read_pid(&dir) == Some(pid) {
                return self.stop_dir(&dir).await;
            }
        }
        terminate(pid, Duration::from_secs(self.config.stop_timeout)).await;
        Ok(())
    }
}

/// Writes a small file of Berth's own, readable by Berth only.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(contents.as_bytes())
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Makes a directory Berth's alone (0700), creating it when missing.
pub fn private(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    set_mode(dir, 0o700)
}
