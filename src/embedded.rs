//! `berth up` with no database URL: the API, a worker and the scheduler in this
//! one process on the embedded SQLite store, under a data directory.

use std::{io::Write, path::Path, sync::Arc};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::Common;

/// The account `berth up` makes when none is configured.
const DEFAULT_ADMIN: &str = "admin";

pub async fn up(
    common: &Common,
    mut api: api::ApiConfig,
    mut worker: workers::WorkerConfig,
    mut scheduler: scheduler::SchedulerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if let schema::QueueSettings::Nats(_) = common.queue() {
        anyhow::bail!(
            "BERTH_QUEUE=nats needs Postgres (its outbox lives there): set BERTH_DATABASE_URL, \
             or leave BERTH_QUEUE unset for the embedded store"
        );
    }
    // Absolute, so that what is printed and what the roles use cannot drift.
    let dir = std::path::absolute(&worker.process.data_dir)
        .with_context(|| format!("the data directory {}", worker.process.data_dir.display()))?;
    worker.process.data_dir = dir.clone();
    worker.process.homes_dir = std::path::absolute(&worker.process.homes_dir)
        .with_context(|| format!("the homes directory {}", worker.process.homes_dir.display()))?;
    let store = schema::SqliteStore::open(&dir)
        .await
        .with_context(|| format!("the embedded database in {}", dir.display()))?;
    tracing::info!(database = %store.path().display(), "embedded store ready");

    crate::prepare_up(&mut api, &mut worker);
    // Relative places land in the data directory, with everything else of this Berth.
    if Path::new(&scheduler.archive_dir).is_relative() {
        scheduler.archive_dir = dir
            .join(&scheduler.archive_dir)
            .to_string_lossy()
            .into_owned();
    }
    if api.jwt_private_key.is_none() {
        api.jwt_private_key = Some(kept_secret(&dir.join("jwt-key.pem"), || {
            api::tokens::JwtKeys::generate_pem().map_err(anyhow::Error::msg)
        })?);
    }
    let password_file = dir.join("admin-password");
    let user = api
        .admin_user
        .clone()
        .unwrap_or_else(|| DEFAULT_ADMIN.into());
    let login = match (&api.admin_user, &api.admin_password) {
        (None, None) => {
            let password = kept_secret(&password_file, || {
                let bytes: [u8; 12] = rand::random();
                Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
            })?;
            api.admin_user = Some(DEFAULT_ADMIN.into());
            api.admin_password = Some(password);
            format!("{DEFAULT_ADMIN}, password in {}", password_file.display())
        }
        (Some(user), _) => format!("{user}, with BERTH_ADMIN_PASSWORD"),
        (None, Some(_)) => String::new(),
    };

    // Which spawner, why, and (local processes) who they run as: said at every start.
    let spawners = workers::choose_spawner(&worker).await?.describe();
    let listener =
        api::serve::bind(api.listen).with_context(|| format!("binding {}", api.listen))?;
    let address = listener.local_addr()?;
    let db = Arc::new(schema::Db::from(store.clone()).with_limits(common.limits()));
    crate::started();
    let json = matches!(common.log_format, crate::LogFormat::Json);
    let announce = async {
        // Once the API answers /health: its admin account exists by then.
        for _ in 0..600 {
            if answers(address).await {
                if json {
                    // One JSON line like every other, with the same facts.
                    tracing::info!(
                        database = %store.path().display(),
                        api = %format!("http://{address}/api/v1"),
                        dashboard = %format!("http://{address}/admin"),
                        servers = %format!("http://{address}/user/{{user}}/"),
                        spawner = %spawners,
                        login = %login,
                        "berth is up on its embedded store"
                    );
                    return;
                }
                eprintln!(
                    "\nBerth is up on its embedded store {}.\n  API        http://{address}/api/v1\n  \
                     dashboard  http://{address}/admin\n  servers    http://{address}/user/{{user}}/ \
                     (open one with the url of POST …/users/{{user}}/server/sso)\n  \
                     run as     {spawners}\n  log in as  {login}\n  \
                     a token    curl -X POST http://{address}/api/v1/auth/login \
                     -d '{{\"username\": \"{user}\", \"password\": \"…\"}}'\n",
                    store.path().display()
                );
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    let roles = crate::all_roles(
        &shutdown,
        async {
            api::run(
                api,
                db.clone(),
                listener,
                shutdown.clone(),
                api::Serve::Both,
            )
            .await
            .map_err(Into::into)
        },
        async {
            workers::run(worker, db.clone(), shutdown.clone())
                .await
                .map_err(Into::into)
        },
        async {
            scheduler::run(scheduler, db.clone(), shutdown.clone())
                .await
                .map_err(Into::into)
        },
    );
    tokio::join!(roles, announce).0
}

/// A secret kept in `path` (mode 0600): read when there, else made and written.
fn kept_secret(
    path: &Path,
    make: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(secret) => return Ok(secret.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let secret = make()?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(secret.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    Ok(secret)
}

/// Whether the API at `address` answers `GET /health`.
async fn answers(address: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(address).await else {
        return false;
    };
    let mut head = [0u8; 12];
    let request = format!("GET /health HTTP/1.0\r\nHost: {address}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.is_ok()
        && stream.read_exact(&mut head).await.is_ok()
        && head.ends_with(b"200")
}
