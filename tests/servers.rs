//! Spawning and stopping real containers, through either queue backend.

mod common;

use std::time::Duration;

use common::{Backend, MISSING_IMAGE, TestEnv};
use reqwest::{Method, StatusCode};
use serde_json::Value;

const READY_WITHIN: Duration = Duration::from_secs(30);

fn is_running(s: &Value) -> bool {
    s["state"] == "running"
}

async fn spawn_stop_and_cleanup_follow_the_container_contract(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    env.start_worker(&["--server-env", "COURSE=berth-101"]);
    let user = env.user("ann");
    env.create_user(&user).await;

    let (status, body) = env
        .call(Method::POST, &format!("/api/v1/users/{user}/server"), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["state"], "pending_spawn");
    assert_eq!(body["ready"], false);
    let job_id = body["job_id"].as_str().expect("a job id").to_owned();

    let server = env
        .wait_server(
            &format!("/api/v1/users/{user}/server"),
            READY_WITHIN,
            is_running,
        )
        .await;
    assert_eq!(server["ready"], true);
    assert_eq!(
        server["url"].as_str(),
        Some(format!("{}/user/{user}/", env.base).as_str()),
        "users reach it through the proxy"
    );
    let url = server["internal_url"]
        .as_str()
        .expect("the internal address, shown to an admin");
    assert!(
        server["started"].is_string() && server["last_activity"].is_string(),
        "{server}"
    );
    assert!(server["error"].is_null());

    // The container answers HTTP, but only its proxy: a neighbour without the
    // proxy's secret is refused.
    let refused = reqwest::get(url).await.expect("server answers");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(refused.text().await.unwrap().contains("proxy only"));

    let job = env.wait_job(&job_id, READY_WITHIN).await;
    assert_eq!(job["kind"], "spawn");
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["attempts"], 1);
    assert!(
        job["started"].is_string() && job["finished"].is_string(),
        "{job}"
    );

    let container = env.container(&user);
    assert_eq!(env.containers(), vec![container.clone()]);
    let inspect = env.inspect(&container);
    let host = &inspect["HostConfig"];
    assert_eq!(host["Memory"], 256 * 1024 * 1024);
    assert_eq!(host["NanoCpus"], 500_000_000);
    assert_eq!(host["PidsLimit"], 64);
    assert_eq!(
        host["SecurityOpt"],
        serde_json::json!(["no-new-privileges:true"])
    );
    assert_eq!(host["CapDrop"], serde_json::json!(["ALL"]));
    let mount = &inspect["Mounts"][0];
    assert_eq!(mount["Type"], "volume");
    assert_eq!(mount["Name"], env.volume(&user));
    assert_eq!(mount["Destination"], "/data");
    let labels = &inspect["Config"]["Labels"];
    assert_eq!(labels["berth.user"], user.as_str());
    assert_eq!(labels["berth.server"], "");
    assert_eq!(labels["berth.instance"], env.id.as_str());
    let env_vars: Vec<&str> = inspect["Config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        env_vars.contains(&format!("BERTH_USER={user}").as_str()),
        "{env_vars:?}"
    );
    assert!(env_vars.contains(&"COURSE=berth-101"), "{env_vars:?}");
    assert!(
        env_vars
            .iter()
            .any(|v| v.starts_with("BERTH_API_TOKEN=") && v.len() > 60),
        "{env_vars:?}"
    );
    assert_eq!(
        inspect["Config"]["User"], "1000:1000",
        "the image's non-root user is kept"
    );

    // A second start of a running server is not a second spawn.
    let (status, again) = env
        .call(Method::POST, &format!("/api/v1/users/{user}/server"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(
        env.count("select count(*) from jobs where kind = 'spawn'")
            .await,
        1
    );

    // Stop: the container goes, the volume stays.
    let (status, stopping) = env
        .call(
            Method::DELETE,
            &format!("/api/v1/users/{user}/server"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{stopping}");
    assert_eq!(stopping["state"], "pending_stop");
    let stop_job = stopping["job_id"].as_str().unwrap().to_owned();
    env.wait_server(&format!("/api/v1/users/{user}/server"), READY_WITHIN, |s| {
        s["state"] == "stopped"
    })
    .await;
    assert_eq!(
        env.wait_job(&stop_job, READY_WITHIN).await["state"],
        "succeeded"
    );
    assert!(env.containers().is_empty(), "{:?}", env.containers());
    assert_eq!(env.volumes(), vec![env.volume(&user)]);
    // An API stop is audited as the dashboard's is: who stopped what, with the job.
    let (_, audit) = env
        .call(Method::GET, "/api/v1/admin/audit?per_page=500", None)
        .await;
    let target = format!("{user}/");
    let entry = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "server_stopped" && e["target"] == target.as_str())
        .unwrap_or_else(|| panic!("no server_stopped for {target} in {audit}"));
    assert_eq!(entry["detail"]["job_id"], stop_job.as_str(), "{entry}");

    // A stop of a stopped server is a no-op.
    let (status, _) = env
        .call(
            Method::DELETE,
            &format!("/api/v1/users/{user}/server"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // A named server next to the default one.
    let (status, body) = env
        .call(
            Method::POST,
            &format!("/api/v1/users/{user}/servers/lab"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    env.wait_server(
        &format!("/api/v1/users/{user}/servers/lab"),
        READY_WITHIN,
        is_running,
    )
    .await;
    assert_eq!(env.containers(), vec![env.container_of(&user, "lab")]);
    let (_, shown) = env
        .call(Method::GET, &format!("/api/v1/users/{user}"), None)
        .await;
    assert_eq!(shown["servers"][""]["state"], "stopped", "{shown}");
    assert_eq!(shown["servers"]["lab"]["state"], "running", "{shown}");

    // Cleanup: every server stopped, the volume removed, the user gone.
    let (status, removal) = env
        .call(Method::DELETE, &format!("/api/v1/users/{user}"), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{removal}");
    let cleanup = env
        .wait_job(removal["job_id"].as_str().unwrap(), READY_WITHIN)
        .await;
    assert_eq!(cleanup["state"], "succeeded", "{cleanup}");
    let (status, _) = env
        .call(Method::GET, &format!("/api/v1/users/{user}"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(env.containers().is_empty(), "{:?}", env.containers());
    assert!(env.volumes().is_empty(), "{:?}", env.volumes());
}

async fn twenty_concurrent_spawns_of_one_server_make_one_container(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    env.start_worker(&[]);
    let user = env.user("bo");
    env.create_user(&user).await;

    let path = format!("/api/v1/users/{user}/servers/nb");
    let answers =
        futures::future::join_all((0..20).map(|_| env.call(Method::POST, &path, None))).await;
    let mut job_ids = std::collections::HashSet::new();
    for (status, body) in &answers {
        assert!(
            *status == StatusCode::ACCEPTED || *status == StatusCode::OK,
            "{status}: {body}"
        );
        if let Some(id) = body["job_id"].as_str() {
            job_ids.insert(id.to_owned());
        }
    }
    assert_eq!(
        job_ids.len(),
        1,
        "every pending answer names the same job: {job_ids:?}"
    );
    env.wait_server(&path, READY_WITHIN, is_running).await;
    assert_eq!(
        env.count("select count(*) from jobs where kind = 'spawn'")
            .await,
        1
    );
    assert_eq!(env.containers(), vec![env.container_of(&user, "nb")]);
}

async fn a_missing_image_fails_the_server_and_leaves_no_container(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    env.start_worker(&[]);
    let user = env.user("cy");
    env.create_user(&user).await;

    let body = format!(r#"{{"image": "{MISSING_IMAGE}"}}"#);
    let path = format!("/api/v1/users/{user}/server");
    let (status, pending) = env.call(Method::POST, &path, Some(&body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pending}");
    let failed = env
        .wait_server(&path, READY_WITHIN, |s| s["state"] == "failed")
        .await;
    let error = failed["error"].as_str().expect("an error");
    assert!(
        error.contains(MISSING_IMAGE)
            && error.contains("could not be pulled")
            && error.contains("Without a registry")
            && error.contains("docker load"),
        "{error}"
    );
    assert_eq!(failed["ready"], false);

    let job = env
        .wait_job(pending["job_id"].as_str().unwrap(), READY_WITHIN)
        .await;
    assert_eq!(job["state"], "failed");
    assert_eq!(job["last_error"], error);
    assert!(env.containers().is_empty(), "{:?}", env.containers());

    // A failed server can be started again.
    let (status, retry) = env.call(Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{retry}");
    env.wait_server(&path, READY_WITHIN, is_running).await;
}

async fn a_stop_during_a_spawn_wins(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    // The server takes 3 s to answer, so the stop lands while the spawn waits.
    env.start_worker(&["--server-env", "BERTH_TEST_START_DELAY=3"]);
    let user = env.user("di");
    env.create_user(&user).await;
    let path = format!("/api/v1/users/{user}/server");

    let (status, spawn) = env.call(Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // Wait until the container exists, then ask for the stop.
    let deadline = tokio::time::Instant::now() + READY_WITHIN;
    while env.containers().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the spawn never created its container"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, stop) = env.call(Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{stop}");

    env.wait_server(&path, READY_WITHIN, |s| s["state"] == "stopped")
        .await;
    let spawn_job = env
        .wait_job(spawn["job_id"].as_str().unwrap(), READY_WITHIN)
        .await;
    assert_eq!(spawn_job["state"], "cancelled", "{spawn_job}");
    assert_eq!(
        env.wait_job(stop["job_id"].as_str().unwrap(), READY_WITHIN)
            .await["state"],
        "succeeded"
    );
    assert!(
        env.containers().is_empty(),
        "no container survives: {:?}",
        env.containers()
    );
}

async fn a_job_enqueued_while_the_worker_was_down_still_runs(backend: Backend) {
    let mut env = TestEnv::on(backend).await;
    let user = env.user("ed");
    env.create_user(&user).await;

    // A worker process comes up and is killed hard before any job exists.
    let first = env.start_worker_process(&[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.kill_worker(first);

    let path = format!("/api/v1/users/{user}/server");
    let (status, pending) = env.call(Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pending}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, still) = env.call(Method::GET, &path, None).await;
    assert_eq!(
        still["state"], "pending_spawn",
        "nobody should have picked it up yet"
    );

    env.start_worker_process(&[]);
    env.wait_server(&path, READY_WITHIN, is_running).await;
    let job = env
        .wait_job(pending["job_id"].as_str().unwrap(), READY_WITHIN)
        .await;
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["attempts"], 1);
    assert_eq!(env.containers(), vec![env.container(&user)]);
}

on_every_store!(
    spawn_stop_and_cleanup_follow_the_container_contract,
    twenty_concurrent_spawns_of_one_server_make_one_container,
    a_missing_image_fails_the_server_and_leaves_no_container,
    a_stop_during_a_spawn_wins,
);

// Worker processes come and go: Postgres only.
on_both_backends!(a_job_enqueued_while_the_worker_was_down_still_runs);

/// What a test put on the engine under another deployment's labels: removed when
/// the test ends, passed or not (the test's own instance label does not cover it).
struct Foreign {
    containers: Vec<String>,
    volumes: Vec<String>,
}

impl Drop for Foreign {
    fn drop(&mut self) {
        for name in &self.containers {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f", name])
                .output();
        }
        for name in &self.volumes {
            let _ = std::process::Command::new("docker")
                .args(["volume", "rm", "-f", name])
                .output();
        }
    }
}

fn docker_ok(args: &[&str]) -> bool {
    std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker cli")
        .status
        .success()
}

/// The address a server listens on, as an admin sees it (`http://ip:port/`).
fn ip_and_port(server: &Value) -> (String, String) {
    let url = server["internal_url"].as_str().expect("an internal url");
    let authority = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let (ip, port) = authority.split_once(':').expect("ip:port");
    (ip.to_owned(), port.to_owned())
}

#[tokio::test]
async fn servers_cannot_reach_one_another_and_deployments_sharing_an_engine_stay_apart() {
    let mut env = TestEnv::on(Backend::Postgres).await;
    env.start_worker(&[]);
    let (ann, bob, carol, dave) = (
        env.user("ann"),
        env.user("bob"),
        env.user("carol"),
        env.user("dave"),
    );
    for user in [&ann, &bob, &carol, &dave] {
        env.create_user(user).await;
    }

    // Another deployment's container holds the name Carol's server would get, and
    // its volume Dave's; both carry that deployment's labels.
    let foreign = Foreign {
        containers: vec![env.container(&carol)],
        volumes: vec![env.volume(&dave)],
    };
    assert!(docker_ok(&[
        "run",
        "-d",
        "--name",
        &foreign.containers[0],
        "--label",
        "berth.managed=true",
        "--label",
        "berth.instance=elsewhere",
        "--label",
        &format!("berth.user={carol}"),
        "--label",
        "berth.server=",
        "--entrypoint",
        "/bin/busybox",
        common::TEST_IMAGE,
        "sleep",
        "600",
    ]));
    assert!(docker_ok(&[
        "volume",
        "create",
        "--label",
        "berth.managed=true",
        "--label",
        "berth.instance=elsewhere",
        "--label",
        &format!("berth.user={dave}"),
        &foreign.volumes[0],
    ]));

    let mut servers = vec![];
    for user in [&ann, &bob] {
        let path = format!("/api/v1/users/{user}/server");
        let (status, body) = env.call(Method::POST, &path, None).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        servers.push(env.wait_server(&path, READY_WITHIN, is_running).await);
    }
    let mut containers = env.containers();
    containers.sort();
    assert_eq!(
        containers,
        vec![env.container(&ann), env.container(&bob)],
        "containers carry this deployment's instance in their names"
    );
    assert!(env.container(&ann).contains(&env.id));

    // From the host (where workers and the proxy run) both answer; from Ann's
    // container, her own server answers and Bob's cannot be reached.
    let (bob_ip, bob_port) = ip_and_port(&servers[1]);
    let (_, ann_port) = ip_and_port(&servers[0]);
    tokio::net::TcpStream::connect(format!("{bob_ip}:{bob_port}"))
        .await
        .expect("the host reaches Bob's server");
    let from_ann = |target: String| {
        docker_ok(&[
            "exec",
            &env.container(&ann),
            "/bin/busybox",
            "sh",
            "-c",
            &format!("echo | /bin/busybox nc -w 3 {target}"),
        ])
    };
    assert!(
        from_ann(format!("127.0.0.1 {ann_port}")),
        "nc inside Ann's container reaches her own server"
    );
    assert!(
        !from_ann(format!("{bob_ip} {bob_port}")),
        "Ann's code reached Bob's server directly"
    );
    let network = env.network();
    let options = docker_lines_of(&[
        "network",
        "inspect",
        &network,
        "--format",
        "{{index .Options \"com.docker.network.bridge.enable_icc\"}}",
    ]);
    assert_eq!(options, "false");

    // Carol's spawn meets the other deployment's container: it fails, saying so,
    // and that container still runs.
    let path = format!("/api/v1/users/{carol}/server");
    let (status, body) = env.call(Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let carols = env
        .wait_server(&path, READY_WITHIN, |s| s["state"] == "failed")
        .await;
    assert!(
        carols["error"].as_str().unwrap().contains("did not create"),
        "{carols}"
    );
    assert_eq!(
        docker_lines_of(&[
            "inspect",
            "--format",
            "{{.State.Running}}",
            &foreign.containers[0]
        ]),
        "true",
        "another deployment's container is left running"
    );

    // Dave's spawn meets the other deployment's volume: not mounted, not removed,
    // not even when Dave is deleted.
    let path = format!("/api/v1/users/{dave}/server");
    let (status, body) = env.call(Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let daves = env
        .wait_server(&path, READY_WITHIN, |s| s["state"] == "failed")
        .await;
    assert!(
        daves["error"].as_str().unwrap().contains("volume"),
        "{daves}"
    );
    let (status, body) = env
        .call(Method::DELETE, &format!("/api/v1/users/{dave}"), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    common::wait_for("Dave's removal", READY_WITHIN, async || {
        env.call(Method::GET, &format!("/api/v1/users/{dave}"), None)
            .await
            .0
            == StatusCode::NOT_FOUND
    })
    .await;
    assert!(
        docker_ok(&["volume", "inspect", &foreign.volumes[0]]),
        "another deployment's volume survives the deletion of a user of the same name"
    );
}

fn docker_lines_of(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker cli");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
