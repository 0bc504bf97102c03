//! Server profiles: operators define them, users pick among those open to them,
//! the container gets the profile's image, limits, environment, mounts and
//! devices, a profile's own limit holds, and the culler uses its timeouts.

mod common;

use std::{process::Command, time::Duration};

use common::{TEST_IMAGE, TestEnv, local::LocalPlaces, wait_for};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const READY_WITHIN: Duration = Duration::from_secs(30);

async fn define(env: &TestEnv, profile: Value) -> Value {
    let (status, body) = env
        .call(
            Method::POST,
            "/api/v1/admin/profiles",
            Some(&profile.to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

async fn spawn_with(
    env: &TestEnv,
    token: Option<&str>,
    user: &str,
    body: Value,
) -> (StatusCode, Value) {
    env.call_with(
        Method::POST,
        &format!("/api/v1/users/{user}/server"),
        Some(&body.to_string()),
        Some(token.unwrap_or(common::TOKEN)),
    )
    .await
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|p| {
            p["name"]
                .as_str()
                .or(p["profile"]["name"].as_str())
                .unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_define_profiles_and_users_get_those_their_role_or_group_opens() {
    let env = TestEnv::start().await;

    // The issue's example is a profile; bad ones are refused and name the field.
    let example = json!({
        "name": "small", "display_name": "Python, 2 GB", "description": "For the course",
        "image": TEST_IMAGE, "mem_limit": "2G", "cpu_limit": 1.0, "pids_limit": 512,
        "env": {"KEY": "value"}, "roles": ["user"], "groups": [], "max_active": 10,
        "gpus": {"count": 1}
    });
    let created = define(&env, example).await;
    assert_eq!(created["profile"]["display_name"], "Python, 2 GB");
    assert_eq!(created["source"], "api");
    assert_eq!(created["active"], 0);
    assert_eq!(created["profile"]["gpus"], json!({"count": 1}));
    for (bad, says) in [
        (json!({"name": "small"}), "already exists"),
        (json!({"name": "Bad"}), "profile name"),
        (json!({"name": "x", "mem_limit": "lots"}), "mem_limit"),
        (
            json!({"name": "x", "env": {"BERTH_API_TOKEN": "mine"}}),
            "set by Berth",
        ),
        (json!({"name": "x", "roles": ["root"]}), "root"),
        (json!({"name": "x", "max_active": 0}), "max_active"),
        (json!({"display_name": "no name"}), "name"),
    ] {
        let (status, body) = env
            .call(
                Method::POST,
                "/api/v1/admin/profiles",
                Some(&bad.to_string()),
            )
            .await;
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::CONFLICT,
            "{bad}: {status} {body}"
        );
        assert!(body["error"].is_string(), "{body}");
        assert!(
            body["message"].as_str().unwrap().contains(says),
            "{bad}: {body}"
        );
    }
    let (_, listed) = env.call(Method::GET, "/api/v1/admin/profiles", None).await;
    assert_eq!(names(&listed), vec!["small"], "nothing refused was written");

    // PATCH changes the fields it names; null clears one; the name stays.
    let (status, changed) = env
        .call(
            Method::PATCH,
            "/api/v1/admin/profiles/small",
            Some(
                &json!({"display_name": "Python, 1 GB", "mem_limit": "1G", "gpus": null})
                    .to_string(),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    let changed = &changed["profile"];
    assert_eq!(changed["mem_limit"], "1G");
    assert!(
        changed["gpus"].is_null() && changed["image"] == TEST_IMAGE,
        "{changed}"
    );
    for (path, body, want) in [
        (
            "/api/v1/admin/profiles/small",
            json!({"name": "big"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/v1/admin/profiles/small",
            json!({"cpu_limit": -1}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/v1/admin/profiles/none",
            json!({"cpu_limit": 1}),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let (status, answer) = env.call(Method::PATCH, path, Some(&body.to_string())).await;
        assert_eq!(status, want, "{path} {body}: {answer}");
    }
    let (_, small) = env
        .call(Method::GET, "/api/v1/admin/profiles/small", None)
        .await;
    assert_eq!(
        small["profile"]["cpu_limit"], 1.0,
        "a refused change changed nothing"
    );

    // Who may pick what.
    define(&env, json!({"name": "open", "display_name": "Anyone"})).await;
    define(&env, json!({"name": "lab-only", "groups": ["lab"]})).await;
    define(&env, json!({"name": "admins", "roles": ["admin"]})).await;
    let (ann, bob) = (env.user("ann"), env.user("bob"));
    let ann_token = env.register(&ann, "correct horse battery").await;
    let bob_token = env.register(&bob, "correct horse battery").await;
    let (status, _) = env
        .call_with(
            Method::GET,
            "/api/v1/admin/profiles",
            None,
            Some(&ann_token),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "users do not manage profiles"
    );
    let (status, bob_view) = env
        .call(
            Method::PATCH,
            &format!("/api/v1/admin/users/{bob}"),
            Some(&json!({"groups": ["lab"]}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{bob_view}");
    assert_eq!(bob_view["groups"], json!(["lab"]));
    let (_, mine) = env
        .call_with(Method::GET, "/api/v1/profiles", None, Some(&ann_token))
        .await;
    assert_eq!(names(&mine), vec!["open", "small"]);
    assert_eq!(mine[0]["display_name"], "Anyone");
    let (_, theirs) = env
        .call_with(Method::GET, "/api/v1/profiles", None, Some(&bob_token))
        .await;
    assert_eq!(names(&theirs), vec!["lab-only", "open", "small"]);
    let (status, _) = env
        .call_with(
            Method::GET,
            &format!("/api/v1/profiles?user={bob}"),
            None,
            Some(&ann_token),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "not another user's list");
    let (_, for_bob) = env
        .call(Method::GET, &format!("/api/v1/profiles?user={bob}"), None)
        .await;
    assert_eq!(
        names(&for_bob),
        vec!["lab-only", "open", "small"],
        "a portal asks for a user"
    );

    let (status, body) =
        spawn_with(&env, Some(&ann_token), &ann, json!({"profile": "lab-only"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("not open to"),
        "{body}"
    );
    let (status, body) = spawn_with(&env, Some(&ann_token), &ann, json!({"profile": "nope"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = spawn_with(
        &env,
        Some(&ann_token),
        &ann,
        json!({"profile": "open", "image": TEST_IMAGE}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        env.count("select count(*) from servers").await,
        0,
        "refused spawns wrote nothing"
    );
    let (status, body) =
        spawn_with(&env, Some(&bob_token), &bob, json!({"profile": "lab-only"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["profile"], "lab-only");

    // Joining the group opens the profile.
    env.call(
        Method::PATCH,
        &format!("/api/v1/admin/users/{ann}"),
        Some(&json!({"groups": ["lab"]}).to_string()),
    )
    .await;
    let (status, body) =
        spawn_with(&env, Some(&ann_token), &ann, json!({"profile": "lab-only"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (_, shown) = env
        .call_with(
            Method::GET,
            &format!("/api/v1/users/{ann}/server"),
            None,
            Some(&ann_token),
        )
        .await;
    assert_eq!(shown["profile"], "lab-only", "{shown}");

    // A `default` profile applies to spawns that name none, under its own rules.
    define(&env, json!({"name": "default", "roles": ["admin"]})).await;
    let carl = env.user("carl");
    let carl_token = env.register(&carl, "correct horse battery").await;
    let (status, body) = spawn_with(&env, Some(&carl_token), &carl, json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = env
        .call(
            Method::PATCH,
            "/api/v1/admin/profiles/default",
            Some(&json!({"roles": null}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = spawn_with(&env, Some(&carl_token), &carl, json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["profile"], "default");

    // Removing a profile leaves its servers as they are; every step was audited.
    let (status, _) = env
        .call(Method::DELETE, "/api/v1/admin/profiles/lab-only", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = env
        .call(Method::DELETE, "/api/v1/admin/profiles/lab-only", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, shown) = env
        .call(Method::GET, &format!("/api/v1/users/{bob}/server"), None)
        .await;
    assert_eq!(shown["profile"], "lab-only");
    assert_eq!(
        env.count(
            "select count(*) from audit_log where action in \
             ('profile_created', 'profile_changed', 'profile_deleted', 'groups_changed')"
        )
        .await,
        5 + 2 + 1 + 2,
        "five made, two changed (refused changes are not), one removed, two groups set"
    );
}

/// Through the API, concurrently: a profile of two places admits exactly two of
/// twelve users, and tells the others why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_profile_s_own_limit_admits_exactly_its_places_under_concurrent_requests() {
    let env = TestEnv::start().await;
    define(&env, json!({"name": "gpu-small", "max_active": 2})).await;
    let users: Vec<String> = (0..12).map(|i| env.user(&format!("g{i}"))).collect();
    for user in &users {
        env.create_user(user).await;
    }
    let answers = futures::future::join_all(
        users
            .iter()
            .map(|user| spawn_with(&env, None, user, json!({"profile": "gpu-small"}))),
    )
    .await;
    let admitted = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::ACCEPTED)
        .count();
    let refused: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .map(|(_, b)| b)
        .collect();
    assert_eq!((admitted, refused.len()), (2, 10), "{answers:?}");
    assert!(
        refused[0]["message"]
            .as_str()
            .unwrap()
            .contains("profile \"gpu-small\" is full: all 2 of its places are taken"),
        "{}",
        refused[0]
    );
    // Without the profile, the platform still has room.
    let (status, body) = spawn_with(&env, None, &users[0], json!({})).await;
    assert!(
        status == StatusCode::ACCEPTED || status == StatusCode::OK,
        "{body}"
    );
    let (_, listed) = env
        .call(Method::GET, "/api/v1/admin/profiles/gpu-small", None)
        .await;
    assert_eq!(listed["active"], 2);
}

fn docker(args: &[&str]) {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A directory of the test's, removed also when it fails.
struct Dir(std::path::PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::create_dir_all(&path).expect("a test directory");
        Self(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes the image tag the test made, also when it fails.
struct Tag(String);

impl Drop for Tag {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_profile_s_container_has_its_image_limits_environment_mounts_and_devices() {
    let mut env = TestEnv::start().await;
    env.start_worker(&[]);
    // The profile's image: the test image under a name of this test's.
    let tag = Tag(format!("berth-test-server:profile-{}", env.id));
    docker(&["tag", TEST_IMAGE, &tag.0]);
    let shared = format!("berth_{}_shared", env.id);
    docker(&[
        "volume",
        "create",
        "--label",
        &format!("berth.instance={}", env.id),
        &shared,
    ]);
    let data = Dir::new(&format!("profile-data-{}", env.id));
    std::fs::write(data.0.join("README"), "datasets").unwrap();
    define(
        &env,
        json!({
            "name": "course", "image": tag.0, "mem_limit": "300M", "cpu_limit": 0.25,
            "pids_limit": 77, "env": {"COURSE": "berth-101"},
            "mounts": [
                {"type": "bind", "source": data.0.to_str().unwrap(), "target": "/datasets", "read_only": true},
                {"type": "volume", "source": shared, "target": "/shared"}
            ]
        }),
    )
    .await;
    let user = env.user("ann");
    env.create_user(&user).await;
    let path = format!("/api/v1/users/{user}/server");
    let (status, body) = spawn_with(&env, None, &user, json!({"profile": "course"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let server = env
        .wait_server(&path, READY_WITHIN, |s| s["state"] == "running")
        .await;
    assert_eq!(server["profile"], "course");
    assert_eq!(server["image"], tag.0.as_str());

    let container = env.container(&user);
    let inspect = env.inspect(&container);
    assert_eq!(inspect["Config"]["Image"], tag.0.as_str());
    let host = &inspect["HostConfig"];
    assert_eq!(host["Memory"], 300 * 1024 * 1024);
    assert_eq!(host["NanoCpus"], 250_000_000);
    assert_eq!(host["PidsLimit"], 77);
    assert_eq!(env.container_env(&container, "COURSE"), "berth-101");
    let mounts = inspect["Mounts"].as_array().unwrap();
    let mount = |target: &str| {
        mounts
            .iter()
            .find(|m| m["Destination"] == target)
            .unwrap_or_else(|| panic!("no mount at {target}: {mounts:?}"))
    };
    assert_eq!(
        mount("/data")["Name"],
        env.volume(&user),
        "the home volume stays"
    );
    assert_eq!(mount("/datasets")["Type"], "bind");
    assert_eq!(mount("/datasets")["RW"], false);
    assert_eq!(mount("/shared")["Name"], shared.as_str());
    assert_eq!(mount("/shared")["RW"], true);

    // A change to the profile affects new spawns only.
    let (status, _) = env
        .call(
            Method::PATCH,
            "/api/v1/admin/profiles/course",
            Some(&json!({"mem_limit": "200M"}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        env.inspect(&container)["HostConfig"]["Memory"],
        300 * 1024 * 1024
    );
    let second = format!("/api/v1/users/{user}/servers/second");
    let (status, body) = env
        .call(
            Method::POST,
            &second,
            Some(&json!({"profile": "course"}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    env.wait_server(&second, READY_WITHIN, |s| s["state"] == "running")
        .await;
    assert_eq!(
        env.inspect(&env.container_of(&user, "second"))["HostConfig"]["Memory"],
        200 * 1024 * 1024
    );

    // GPUs on a host without a GPU driver: the spawn fails at once, says why, and
    // leaves no container (the request's shape is a unit test of the spawner).
    define(&env, json!({"name": "gpu", "gpus": {"count": 1}})).await;
    let gpu = format!("/api/v1/users/{user}/servers/gpu");
    let (status, body) = env
        .call(
            Method::POST,
            &gpu,
            Some(&json!({"profile": "gpu"}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job = env
        .wait_job(body["job_id"].as_str().unwrap(), READY_WITHIN)
        .await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["attempts"], 1, "not retried: {job}");
    let failed = env
        .wait_server(&gpu, READY_WITHIN, |s| s["state"] == "failed")
        .await;
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("devices") && error.contains("nvidia"),
        "{error}"
    );
    assert!(
        !env.containers().contains(&env.container_of(&user, "gpu")),
        "no container is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_process_spawner_runs_a_profile_s_command() {
    let mut env = TestEnv::start().await;
    let places = LocalPlaces::new("profile", &env.id);
    let mut flags = vec![
        "--spawner",
        "process",
        "--server-command",
        "busybox httpd -f -p 127.0.0.1:{port}",
    ];
    flags.extend(places.flags());
    env.start_worker_process(&flags);
    define(
        &env,
        json!({"name": "marked", "command": "busybox httpd -f -p 127.0.0.1:{port} -h . # profile-marked"}),
    )
    .await;
    let user = env.user("proc");
    env.create_user(&user).await;
    let path = format!("/api/v1/users/{user}/server");
    let (status, body) = spawn_with(&env, None, &user, json!({"profile": "marked"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    env.wait_server(&path, READY_WITHIN, |s| s["state"] == "running")
        .await;
    let run = places.root.join("run").join(format!("berth-{user}"));
    let log = walk(&places.root);
    assert!(run.is_dir(), "the server's run directory");
    assert!(
        log.contains("# profile-marked"),
        "the profile's command ran: {log}"
    );
    env.call(Method::DELETE, &path, None).await;
    env.wait_server(&path, READY_WITHIN, |s| s["state"] == "stopped")
        .await;
}

/// The culler stops a server of a profile with a short idle timeout and leaves
/// one on the scheduler's long default alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_culler_uses_a_profile_s_idle_timeout() {
    let mut env = TestEnv::start().await;
    env.start_worker(&[]);
    define(&env, json!({"name": "brief", "idle_timeout": 2})).await;
    let (brief, plain) = (env.user("brief"), env.user("plain"));
    for (user, body) in [(&brief, json!({"profile": "brief"})), (&plain, json!({}))] {
        env.create_user(user).await;
        let (status, answer) = spawn_with(&env, None, user, body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        env.wait_server(&format!("/api/v1/users/{user}/server"), READY_WITHIN, |s| {
            s["state"] == "running"
        })
        .await;
    }
    env.start_scheduler(&[
        "--cull-schedule",
        "* * * * * *",
        "--session-expiry-schedule",
        "off",
        "--archive-schedule",
        "off",
        "--idle-timeout",
        "3600",
    ]);
    let brief_path = format!("/api/v1/users/{brief}/server");
    wait_for(
        "the brief profile's server to be culled",
        Duration::from_secs(30),
        async || env.call(Method::GET, &brief_path, None).await.1["state"] == "stopped",
    )
    .await;
    let (_, server) = env
        .call(Method::GET, &format!("/api/v1/users/{plain}/server"), None)
        .await;
    assert_eq!(server["state"], "running", "{server}");
    assert_eq!(
        env.count("select count(*) from jobs where kind = 'stop'")
            .await,
        1,
        "only the brief profile's server was stopped"
    );
}

/// `BERTH_PROFILES` at start: its profiles are there, marked as the file's, and
/// a bad file stops the start with a message that names the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_profiles_file_defines_profiles_at_start() {
    let dir = Dir::new(&format!("profiles-file-{:08x}", rand::random::<u32>()));
    let file = dir.0.join("profiles.json");
    std::fs::write(
        &file,
        json!([{"name": "python", "display_name": "Python", "mem_limit": "1G", "max_active": 3}])
            .to_string(),
    )
    .unwrap();
    let env = TestEnv::start_with(&["--profiles-file", file.to_str().unwrap()]).await;
    let (_, listed) = env.call(Method::GET, "/api/v1/admin/profiles", None).await;
    assert_eq!(names(&listed), vec!["python"]);
    assert_eq!(listed[0]["source"], "file");
    assert_eq!(listed[0]["profile"]["max_active"], 3);

    // A bad file: `berth api` does not start, and says which profile and field.
    std::fs::write(
        &file,
        json!([{"name": "python", "mem_limit": "lots"}]).to_string(),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("api")
        .env("BERTH_DATABASE_URL", &env.db_url)
        .env("BERTH_LISTEN", "127.0.0.1:0")
        .env("BERTH_PROFILES", &file)
        .env("BERTH_LOG", "warn")
        .output()
        .expect("berth runs");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("BERTH_PROFILES")
            && said.contains("\"python\"")
            && said.contains("mem_limit"),
        "{said}"
    );
    let (_, listed) = env.call(Method::GET, "/api/v1/admin/profiles", None).await;
    assert_eq!(
        listed[0]["profile"]["mem_limit"], "1G",
        "the bad file changed nothing"
    );
}

/// Every file's text under `dir`, for finding what a server logged.
fn walk(dir: &std::path::Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            text.push_str(&walk(&path));
        } else if let Ok(read) = std::fs::read_to_string(&path) {
            text.push_str(&read);
        }
    }
    text
}

/// The dashboard: an operator defines, edits and removes a profile, puts a user
/// in a group, starts a server of the profile for them, and filters servers by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_manage_profiles_and_start_servers_with_them_from_the_dashboard() {
    let mut env = TestEnv::start().await;
    env.start_worker(&[]);
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let admin = env.login(common::ADMIN_USER, common::ADMIN_PASSWORD).await;
    let get = async |path: &str| {
        client
            .get(format!("{}{path}", env.base))
            .header("cookie", format!("berth_session={admin}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // A form posted from the dashboard's own page; what the page it leads to says.
    let post = async |path: &str, form: &[(&str, &str)]| {
        let answer = client
            .post(format!("{}{path}", env.base))
            .header("cookie", format!("berth_session={admin}"))
            .header("origin", &env.base)
            .form(form)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), StatusCode::SEE_OTHER, "{path} {form:?}");
        let to = answer.headers()["location"].to_str().unwrap().to_owned();
        get(&to).await
    };
    let refused = post("/admin/profiles", &[("definition", "{not json")]).await;
    assert!(
        refused.contains("class=\"error\"") && refused.contains("not JSON"),
        "{refused}"
    );
    let refused = post(
        "/admin/profiles",
        &[("definition", r#"{"name": "lab", "mem_limit": "1"}"#)],
    )
    .await;
    assert!(refused.contains("mem_limit"), "{refused}");
    assert_eq!(env.count("select count(*) from profiles").await, 0);

    let definition = json!({"name": "lab", "display_name": "Lab environment", "groups": ["lab"], "max_active": 3});
    let page = post(
        "/admin/profiles",
        &[("definition", &definition.to_string())],
    )
    .await;
    assert!(
        page.contains("Profile lab defined") && page.contains("data-profile=\"lab\""),
        "{page}"
    );

    let user = env.user("dora");
    env.create_user(&user).await;
    let page = post(
        &format!("/admin/users/{user}"),
        &[("groups", "lab, course-101"), ("set_groups", "1")],
    )
    .await;
    assert!(page.contains("is in groups: course-101, lab"), "{page}");
    assert!(
        page.contains("<option value=\"lab\">Lab environment</option>"),
        "{page}"
    );
    let page = post(
        &format!("/admin/users/{user}/servers/start"),
        &[("server", "work"), ("profile", "lab")],
    )
    .await;
    assert!(page.contains("Starting"), "{page}");
    let server = env
        .wait_server(
            &format!("/api/v1/users/{user}/servers/work"),
            READY_WITHIN,
            |s| s["state"] == "running",
        )
        .await;
    assert_eq!(server["profile"], "lab");
    let listed = get("/admin/servers?profile=lab").await;
    assert!(
        listed.contains(&format!("data-server=\"{user}/work\"")),
        "{listed}"
    );
    let other = get("/admin/servers?profile=other").await;
    assert!(
        !other.contains(&format!("data-server=\"{user}/work\"")),
        "{other}"
    );
    let page = get("/admin/profiles").await;
    let row = page
        .split("data-profile=\"lab\"")
        .nth(1)
        .unwrap()
        .split("</tr>")
        .next()
        .unwrap();
    assert!(row.contains(">1</a> of 3"), "one active of three: {row}");

    // Saving the form replaces the definition: a field left out is cleared.
    let page = post(
        "/admin/profiles/lab",
        &[(
            "definition",
            r#"{"display_name": "Lab 2", "groups": ["lab"]}"#,
        )],
    )
    .await;
    assert!(page.contains("Profile lab saved"), "{page}");
    let (_, shown) = env
        .call(Method::GET, "/api/v1/admin/profiles/lab", None)
        .await;
    assert_eq!(shown["profile"]["display_name"], "Lab 2");
    assert!(shown["profile"]["max_active"].is_null(), "{shown}");

    let page = post("/admin/profiles/lab/delete", &[]).await;
    assert!(page.contains("Profile lab removed"), "{page}");
    assert_eq!(env.count("select count(*) from profiles").await, 0);
    assert_eq!(
        env.count(
            "select count(*) from audit_log where action like 'profile_%' and actor like 'user:%'"
        )
        .await,
        3
    );
}
