//! The local-process spawner (`BERTH_SPAWNER=process`): servers as child processes
//! of `berth worker`, found again after a worker restart and reconciled like
//! containers.

mod common;

use std::time::Duration;

use common::{
    TestEnv,
    local::{LocalPlaces, alive, pid_of},
    wait_for,
};
use reqwest::{Method, StatusCode};

async fn answers(url: &str) -> bool {
    reqwest::get(url).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_process_servers_spawn_stop_outlive_a_worker_restart_and_are_reconciled() {
    let mut env = TestEnv::start().await;
    let places = LocalPlaces::new("process", &env.id);
    let (root, home) = (&places.root, &places.home);
    let mut flags = vec![
        "--spawner",
        "process",
        "--server-command",
        "busybox httpd -f -p 127.0.0.1:{port}",
    ];
    flags.extend(places.flags());
    let first = env.start_worker_process(&flags);
    let user = env.user("proc");
    env.create_user(&user).await;
    let path = format!("/api/v1/users/{user}/server");
    let (status, _) = env.call(Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let server = env
        .wait_server(&path, Duration::from_secs(30), |s| s["state"] == "running")
        .await;
    let url = server["internal_url"].as_str().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    assert!(answers(&url).await, "the server answers HTTP at {url}");
    let run_dir = root.join("run").join(format!("berth-{user}"));
    let pid = pid_of(&run_dir).expect("a pid file");
    assert!(alive(pid));
    assert!(home.join(&user).is_dir(), "the user's working directory");

    // The worker dies; its server lives on in its own process group, and a new
    // worker finds it again and leaves it running.
    env.kill_worker(first);
    let second = env.start_worker_process(&flags);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, now) = env.call(Method::GET, &path, None).await;
    assert_eq!(now["state"], "running", "{now}");
    assert!(alive(pid) && answers(&url).await);

    // A stop ends the process and its run directory; the working directory stays.
    let (status, _) = env.call(Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    env.wait_server(&path, Duration::from_secs(30), |s| s["state"] == "stopped")
        .await;
    assert!(!alive(pid), "the server process is gone");
    assert!(!run_dir.exists());
    assert!(home.join(&user).is_dir());

    // A server process that dies behind Berth's back is reconciled to failed.
    env.call(Method::POST, &path, None).await;
    env.wait_server(&path, Duration::from_secs(30), |s| s["state"] == "running")
        .await;
    let pid = pid_of(&run_dir).expect("a pid file");
    std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status()
        .unwrap();
    let failed = env
        .wait_server(&path, Duration::from_secs(30), |s| s["state"] == "failed")
        .await;
    assert!(
        failed["error"].as_str().unwrap().contains("exit"),
        "{failed}"
    );

    // A command that cannot serve fails the spawn with its output.
    env.kill_worker(second);
    let mut broken_flags = flags.clone();
    broken_flags[3] = "echo no such server >&2; exit 3";
    env.start_worker_process(&broken_flags);
    let broken = format!("/api/v1/users/{user}/servers/broken");
    let (status, _) = env.call(Method::POST, &broken, None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let ended = env
        .wait_server(&broken, Duration::from_secs(30), |s| s["state"] == "failed")
        .await;
    let error = ended["error"].as_str().unwrap();
    assert!(
        error.contains("exit code 3") && error.contains("no such server"),
        "{error}"
    );

    // Removing the user removes its processes and its working directory.
    let (status, body) = env
        .call(Method::DELETE, &format!("/api/v1/users/{user}"), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    wait_for(
        "the user's directory removed",
        Duration::from_secs(30),
        async || !home.join(&user).exists(),
    )
    .await;
}

/// A worker restarted with another spawner (Docker here, after local processes)
/// leaves the running process servers alone, and stops and removes them with the
/// spawner that started them: each server records which one it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spawner_change_across_restarts_never_fails_or_loses_a_live_server() {
    let mut env = TestEnv::start().await;
    let places = LocalPlaces::new("switch", &env.id);
    let root = &places.root;
    let mut process_flags = vec![
        "--spawner",
        "process",
        "--server-command",
        "busybox httpd -f -p 127.0.0.1:{port}",
    ];
    process_flags.extend(places.flags());
    let first = env.start_worker_process(&process_flags);
    let user = env.user("switch");
    env.create_user(&user).await;
    let path = format!("/api/v1/users/{user}/server");
    env.call(Method::POST, &path, None).await;
    let server = env
        .wait_server(&path, Duration::from_secs(30), |s| s["state"] == "running")
        .await;
    assert_eq!(server["spawner"], "process", "{server}");
    let url = server["internal_url"].as_str().unwrap().to_owned();
    let pid = pid_of(&root.join("run").join(format!("berth-{user}"))).expect("a pid file");

    // The same Berth restarted on Docker: several reconcile passes later the
    // process server still runs and is still running in the database.
    env.kill_worker(first);
    let mut docker_flags = vec!["--spawner", "docker"];
    docker_flags.extend(places.flags());
    let docker = env.start_worker_process(&docker_flags);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, now) = env.call(Method::GET, &path, None).await;
    assert_eq!(now["state"], "running", "{now}");
    assert!(
        alive(pid) && answers(&url).await,
        "the process server lives"
    );

    // The Docker worker stops it with the process spawner: the process ends.
    env.call(Method::DELETE, &path, None).await;
    env.wait_server(&path, Duration::from_secs(30), |s| s["state"] == "stopped")
        .await;
    assert!(!alive(pid), "the server process was stopped");

    // A second process server, then the user removed by the Docker worker.
    env.kill_worker(docker);
    let third = env.start_worker_process(&process_flags);
    env.call(Method::POST, &path, None).await;
    env.wait_server(&path, Duration::from_secs(30), |s| s["state"] == "running")
        .await;
    let pid = pid_of(&root.join("run").join(format!("berth-{user}"))).expect("a pid file");
    env.kill_worker(third);
    env.start_worker_process(&docker_flags);
    let (status, body) = env
        .call(Method::DELETE, &format!("/api/v1/users/{user}"), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    wait_for("the user removed", Duration::from_secs(30), async || {
        env.call(Method::GET, &format!("/api/v1/users/{user}"), None)
            .await
            .0
            == StatusCode::NOT_FOUND
    })
    .await;
    assert!(!alive(pid), "removing the user stopped its process server");
}
