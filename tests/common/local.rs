//! Servers as local processes: what a test leaves behind is killed, and a real
//! Jupyter server to run (`BERTH_TEST_JUPYTER`, installed by `ops/test.sh`).

use std::path::PathBuf;

/// Kills whatever server processes a test left, also when it fails, and removes
/// its data directory (`.0`, holding the instance's directory `.1`) and its users'
/// working directories (beside it, `{data}-homes`).
pub struct Leftovers(pub PathBuf, pub PathBuf);

impl Leftovers {
    /// Where the users' working directories of this data directory are.
    pub fn homes(&self) -> PathBuf {
        homes_of(&self.0)
    }
}

/// The users' working directories that go with a test's data directory.
pub fn homes_of(data: &std::path::Path) -> PathBuf {
    let mut name = data.file_name().unwrap_or_default().to_owned();
    name.push("-homes");
    data.with_file_name(name)
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for dir in std::fs::read_dir(self.1.join("run"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Some(pid) = pid_of(&dir.path()) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_dir_all(self.homes());
    }
}

pub fn pid_of(run_dir: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(run_dir.join("pid"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
}

/// The `jupyter` of the test environment (a venv with jupyter_server and ipykernel).
pub fn jupyter() -> String {
    std::env::var("BERTH_TEST_JUPYTER")
        .unwrap_or_else(|_| "/tmp/berth-test-venv/bin/jupyter".into())
}

/// A Jupyter server as Berth starts it: on its port, under its prefix, taking its
/// token from `JUPYTER_TOKEN` (which the proxy sends).
pub fn jupyter_command() -> String {
    format!(
        "{} server --allow-root --ServerApp.port={{port}} --ServerApp.ip=127.0.0.1 \
         --ServerApp.base_url={{base_url}} --ServerApp.allow_remote_access=True \
         --ServerApp.open_browser=False",
        jupyter()
    )
}

/// A data directory for local servers of the test `id`, cleaned up with them.
pub fn data_dir(id: &str) -> (PathBuf, Leftovers) {
    let data = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("process-{id}"));
    let leftovers = Leftovers(data.clone(), data.join(id));
    (data, leftovers)
}

/// A test's own data and working directories for local-process workers, cleaned
/// up (processes included) when dropped.
pub struct LocalPlaces {
    /// The instance's directory in the data directory (`run/`, `logs/`).
    pub root: PathBuf,
    /// The users' working directories of the instance.
    pub home: PathBuf,
    data: String,
    homes: String,
    _leftovers: Leftovers,
}

impl LocalPlaces {
    pub fn new(prefix: &str, id: &str) -> Self {
        let data = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{prefix}-{id}"));
        let root = data.join(id);
        let leftovers = Leftovers(data.clone(), root.clone());
        let homes = leftovers.homes();
        Self {
            root,
            home: homes.join(id),
            data: data.to_string_lossy().into_owned(),
            homes: homes.to_string_lossy().into_owned(),
            _leftovers: leftovers,
        }
    }

    /// A worker's flags naming these places, reconciling every second.
    pub fn flags(&self) -> Vec<&str> {
        vec![
            "--data-dir",
            &self.data,
            "--homes-dir",
            &self.homes,
            "--reconcile-interval",
            "1",
        ]
    }
}
