//! The store's contract, run against both dialects: each test runs once on a fresh
//! Postgres database (`BERTH_TEST_DATABASE_URL`, a superuser URL) and once on a
//! fresh SQLite file, through the same `schema::Db`. A rule written once must
//! behave the same on both; a new store operation adds its test here.

use std::{path::PathBuf, sync::Arc};

use schema::{
    Accounts, Db, JobKind, JobOutcome, Limits, Maintenance, NewAccount, PgStore, Platform, Role,
    RouteChange, Routes, Running, ServerName, ServerState, SpawnOutcome, SpawnRequest, SqliteStore,
    Store, StoreError, UserName,
    accounts::ThrottleRule,
    identities::Identities,
    platform::{LimitChange, SlotAnswer},
};

/// A store on a fresh database of one dialect, removed when dropped.
struct Fresh {
    db: Db,
    cleanup: Cleanup,
}

enum Cleanup {
    Postgres { admin_url: String, name: String },
    Sqlite(PathBuf),
}

impl Drop for Fresh {
    fn drop(&mut self) {
        match &self.cleanup {
            Cleanup::Sqlite(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Cleanup::Postgres { admin_url, name } => {
                // A runtime of its own: drop runs outside the test's.
                let (admin_url, name) = (admin_url.clone(), name.clone());
                let _ = std::thread::spawn(move || {
                    tokio::runtime::Runtime::new().unwrap().block_on(async {
                        if let Ok(admin) = sqlx::PgPool::connect(&admin_url).await {
                            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                                "drop database if exists {name} with (force)"
                            )))
                            .execute(&admin)
                            .await;
                        }
                    })
                })
                .join();
            }
        }
    }
}

fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

async fn on_postgres() -> Fresh {
    let admin_url = std::env::var("BERTH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into());
    let name = format!("berth_conf_{}", suffix());
    let admin = sqlx::PgPool::connect(&admin_url)
        .await
        .expect("the test Postgres is reachable (BERTH_TEST_DATABASE_URL)");
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let base = admin_url
        .rsplit_once('/')
        .map_or(admin_url.as_str(), |(b, _)| b);
    let pool = sqlx::PgPool::connect(&format!("{base}/{name}"))
        .await
        .unwrap();
    schema::migrate(&pool).await.unwrap();
    Fresh {
        db: Db::from(PgStore::new(pool, Arc::new(schema::ApalisQueue))).with_limits(LIMITS),
        cleanup: Cleanup::Postgres { admin_url, name },
    }
}

/// The contracts' configured limits: two active servers, so that a third is refused.
const LIMITS: Limits = Limits {
    concurrent_spawn_limit: 10,
    active_server_limit: 2,
};

async fn on_sqlite() -> Fresh {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("conf-{}", suffix()));
    let store = SqliteStore::open(&dir).await.unwrap();
    Fresh {
        db: Db::from(store).with_limits(LIMITS),
        cleanup: Cleanup::Sqlite(dir),
    }
}

/// Runs each `async fn(&Db)` contract as `name::postgres` and `name::sqlite`.
macro_rules! contracts {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let fresh = super::on_postgres().await;
                super::$name(&fresh.db).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let fresh = super::on_sqlite().await;
                super::$name(&fresh.db).await;
            }
        }
    )*};
}

fn user(name: &str) -> UserName {
    UserName::parse(name).unwrap()
}

/// What a worker records of a server that became ready.
fn running(server_id: i64, job_id: uuid::Uuid) -> Running {
    Running {
        server_id,
        job_id,
        container_id: "c1".into(),
        url: "http://127.0.0.1:1/".into(),
        token_hash: "server-token".into(),
        proxy_token: "proxy-secret".into(),
        mem_limit: None,
        cpu_limit: None,
        spawner: "docker".into(),
    }
}

fn spawn_request(name: &str) -> SpawnRequest {
    SpawnRequest {
        user: user(name),
        server: ServerName::default_server(),
        image: None,
        max_servers_per_user: None,
        profile: None,
    }
}

async fn states_kinds_and_roles_read_back_typed_and_unknown_words_are_errors(db: &Db) {
    let ann = db.create_user(&user("ann"), true).await.unwrap();
    assert_eq!(ann.role, Role::Admin);
    let SpawnOutcome::Enqueued(server) = db.request_spawn(spawn_request("ann")).await.unwrap()
    else {
        panic!("a first spawn is enqueued");
    };
    assert_eq!(server.state, ServerState::PendingSpawn);
    let job = db
        .get_job(server.spawn_job_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.kind, JobKind::Spawn);
    assert!(job.state.is_open());

    // A word no variant has is refused, not mapped to a default.
    let read = match db_pool(db) {
        Pool::Pg(p) => sqlx::query_scalar::<_, ServerState>("select 'flying'")
            .fetch_one(&p)
            .await
            .map(|_| ()),
        Pool::Lite(p) => sqlx::query_scalar::<_, ServerState>("select 'flying'")
            .fetch_one(&p)
            .await
            .map(|_| ()),
    };
    let error = read.expect_err("an unknown state is an error").to_string();
    assert!(error.contains("unknown ServerState \"flying\""), "{error}");
}

enum Pool {
    Pg(sqlx::PgPool),
    Lite(sqlx::SqlitePool),
}

/// The raw pool under a store, for the few contracts that write behind its back.
fn db_pool(db: &Db) -> Pool {
    match db.on() {
        schema::db::Dialect::Pg(s) => Pool::Pg(s.pool().clone()),
        schema::db::Dialect::Lite(s) => Pool::Lite(s.pool().clone()),
    }
}

async fn a_taken_name_or_email_is_a_conflict_that_says_which(db: &Db) {
    let account = |name: &str, email: &str| NewAccount {
        name: user(name),
        email: Some(email.into()),
        password_hash: None,
        role: Role::User,
    };
    db.register(&account("bob", "bob@example.org"))
        .await
        .unwrap();
    let name = db.register(&account("bob", "other@example.org")).await;
    assert!(
        matches!(&name, Err(StoreError::Conflict(m)) if m.contains("already exists")),
        "{name:?}"
    );
    let email = db.register(&account("rob", "BOB@example.org")).await;
    assert!(
        matches!(&email, Err(StoreError::Conflict(m)) if m.contains("already registered")),
        "{email:?}"
    );
    let page = db.users_page(Some("EXAMPLE"), 0, 10).await.unwrap();
    assert_eq!(page.total, 1, "emails match without regard to case");
    let page = db.users_page(Some("b_b"), 0, 10).await.unwrap();
    assert_eq!(page.total, 0, "a search's wildcards are taken literally");
}

async fn attempts_past_the_limit_are_refused_until_the_window_ends(db: &Db) {
    let rule = ThrottleRule {
        max_failures: 3,
        window_secs: 60,
    };
    let wide = ThrottleRule {
        max_failures: 100,
        window_secs: 60,
    };
    let keys = [("account:7", rule), ("addr:10.0.0.1", wide)];
    for _ in 0..3 {
        assert_eq!(
            db.reserve_attempt(&keys).await.unwrap(),
            None,
            "within the limit"
        );
    }
    let wait = db
        .reserve_attempt(&keys)
        .await
        .unwrap()
        .expect("refused past the limit");
    assert!(
        (59..=60).contains(&wait),
        "locked until the window ends: {wait}"
    );
    db.clear_failures("account:7").await.unwrap();
    assert_eq!(db.reserve_attempt(&keys).await.unwrap(), None);
    // Concurrent attempts are each counted: exactly the limit get through.
    let mut attempts = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let db = db.clone();
        attempts.spawn(async move { db.reserve_attempt(&[("account:8", rule)]).await });
    }
    let answers = attempts.join_all().await;
    let through = answers.iter().filter(|a| matches!(a, Ok(None))).count();
    assert_eq!(through, 3, "{answers:?}");
    // A success gives its attempt back.
    db.release_attempt("addr:10.0.0.1").await.unwrap();
}

async fn an_sso_token_is_consumed_once_by_its_running_server(db: &Db) {
    let dan = db.create_user(&user("dan"), false).await.unwrap();
    let SpawnOutcome::Enqueued(server) = db.request_spawn(spawn_request("dan")).await.unwrap()
    else {
        panic!("enqueued");
    };
    let job = server.spawn_job_id.unwrap();
    assert!(db.begin_job(job, "w").await.unwrap().is_some());
    let running = running(server.id, job);
    assert!(db.mark_running(&running).await.unwrap());
    let expires = chrono::Utc::now() + chrono::TimeDelta::minutes(1);
    db.create_sso("hash-1", dan.id, "", expires, None)
        .await
        .unwrap();
    // Another server's attempt is refused and leaves the token unspent.
    assert!(
        db.consume_sso("hash-1", Some(server.id + 1000))
            .await
            .unwrap()
            .is_none()
    );
    let (a, b) = tokio::join!(
        db.consume_sso("hash-1", Some(server.id)),
        db.consume_sso("hash-1", Some(server.id))
    );
    let grants: Vec<_> = [a.unwrap(), b.unwrap()].into_iter().flatten().collect();
    assert_eq!(grants.len(), 1, "exactly one use succeeds");
    assert_eq!(grants[0].user_name, "dan");
    db.create_sso(
        "hash-2",
        dan.id,
        "",
        chrono::Utc::now() - chrono::TimeDelta::seconds(1),
        None,
    )
    .await
    .unwrap();
    assert!(
        db.consume_sso("hash-2", None).await.unwrap().is_none(),
        "expired"
    );
    // Once the server is gone, its tokens verify no more.
    db.create_sso("hash-3", dan.id, "", expires, None)
        .await
        .unwrap();
    assert!(db.mark_lost(server.id, false, "gone").await.unwrap());
    assert!(
        db.consume_sso("hash-3", None).await.unwrap().is_none(),
        "not running"
    );
}

async fn spawn_slots_hold_the_limit_and_go_to_the_oldest_waiter(db: &Db) {
    let db = &db.clone().with_limits(Limits {
        concurrent_spawn_limit: 10,
        active_server_limit: 10,
    });
    let mut jobs = vec![];
    for name in ["s1", "s2", "s3"] {
        db.create_user(&user(name), false).await.unwrap();
        let SpawnOutcome::Enqueued(server) = db.request_spawn(spawn_request(name)).await.unwrap()
        else {
            panic!("enqueued");
        };
        jobs.push(
            db.get_job(server.spawn_job_id.unwrap())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let ask = async |i: usize, delivery: uuid::Uuid| {
        db.try_spawn_slot(jobs[i].id, jobs[i].created_at, 1, "w", delivery)
            .await
            .unwrap()
    };
    let [d0, d1, d2] = [(); 3].map(|()| uuid::Uuid::new_v4());
    let SlotAnswer::Granted(first) = ask(0, d0).await else {
        panic!("the first spawn to ask gets the one slot");
    };
    assert!(
        matches!(ask(2, d2).await, SlotAnswer::Wait),
        "the limit is 1"
    );
    assert!(matches!(ask(1, d1).await, SlotAnswer::Wait), "still full");
    assert!(
        matches!(ask(2, uuid::Uuid::new_v4()).await, SlotAnswer::Duplicate),
        "another delivery holds a live claim on the job"
    );
    assert_eq!(db.usage().await.unwrap().spawns_in_flight, 1);
    // The spawn runs under its slot and ends; then it waits for nothing.
    assert!(db.begin_job(jobs[0].id, "w").await.unwrap().is_some());
    db.finish_job(jobs[0].id, &JobOutcome::Succeeded)
        .await
        .unwrap();
    first.release().await;
    assert_eq!(db.usage().await.unwrap().spawns_in_flight, 0);
    assert!(
        matches!(ask(2, d2).await, SlotAnswer::Wait),
        "an older spawn waits with a claim: it goes first"
    );
    let SlotAnswer::Granted(second) = ask(1, d1).await else {
        panic!("the oldest waiter gets the freed slot");
    };
    second.release().await;
}

async fn a_minute_has_one_sample_and_ended_jobs_read_back(db: &Db) {
    use schema::{Console, JobState};
    let since = chrono::Utc::now() - chrono::TimeDelta::minutes(2);
    db.create_user(&user("sam"), false).await.unwrap();
    db.create_user(&user("sue"), false).await.unwrap();
    let mut jobs = Vec::new();
    for name in ["sam", "sue"] {
        let SpawnOutcome::Enqueued(server) = db.request_spawn(spawn_request(name)).await.unwrap()
        else {
            panic!("enqueued");
        };
        jobs.push(server.spawn_job_id.unwrap());
    }
    // Two spawns waiting, two places taken: what the minute's sample reads.
    let first = db.record_sample().await.unwrap();
    let second = db.record_sample().await.unwrap();
    let samples = db.samples_since(since).await.unwrap();
    // A minute that turned between the two may hold one each; never two in one.
    assert!(first, "the first sample of a minute is written");
    assert_eq!(samples.len(), 1 + usize::from(second), "{samples:?}");
    let last = samples.last().unwrap();
    assert_eq!((last.queued, last.active_servers), (2, 2), "{samples:?}");
    assert_eq!(
        last.at.timestamp() % 60,
        0,
        "a sample is keyed by its minute"
    );

    assert!(db.jobs_ended_since(since).await.unwrap().is_empty());
    for job in &jobs {
        assert!(db.begin_job(*job, "w").await.unwrap().is_some());
    }
    db.finish_job(jobs[0], &JobOutcome::Succeeded)
        .await
        .unwrap();
    db.finish_job(jobs[1], &JobOutcome::Failed("no image".into()))
        .await
        .unwrap();
    let ended = db.jobs_ended_since(since).await.unwrap();
    let seen: Vec<_> = ended.iter().map(|e| (e.kind, e.state)).collect();
    assert_eq!(
        seen,
        [
            (JobKind::Spawn, JobState::Succeeded),
            (JobKind::Spawn, JobState::Failed)
        ]
    );
    assert!(ended.iter().all(|e| e.finished_at >= e.created_at));
    assert!(
        db.jobs_ended_since(chrono::Utc::now() + chrono::TimeDelta::seconds(1))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn limit_overrides_set_and_reset(db: &Db) {
    let set = db
        .set_limits(LimitChange::Set(3), LimitChange::Keep, "admin")
        .await
        .unwrap();
    assert_eq!(set.concurrent_spawn_limit, Some(3));
    assert_eq!(set.active_server_limit, None);
    assert_eq!(set.updated_by.as_deref(), Some("admin"));
    let reset = db
        .set_limits(LimitChange::Reset, LimitChange::Set(7), "root")
        .await
        .unwrap();
    assert_eq!(reset.concurrent_spawn_limit, None);
    assert_eq!(reset.active_server_limit, Some(7));
    let read = db.limit_overrides().await.unwrap();
    assert_eq!(read.active_server_limit, Some(7));
    assert_eq!(read.updated_by.as_deref(), Some("root"));
}

async fn routes_follow_their_servers_and_traffic_only_moves_activity_forward(db: &Db) {
    let eve = db.create_user(&user("eve"), false).await.unwrap();
    let (changes, mut heard) = tokio::sync::broadcast::channel(16);
    let stop = tokio_util::sync::CancellationToken::new();
    let relay = tokio::spawn({
        let (db, stop) = (db.clone(), stop.clone());
        async move { db.relay_route_changes(changes, stop).await }
    });
    let next = async |heard: &mut tokio::sync::broadcast::Receiver<RouteChange>| {
        tokio::time::timeout(std::time::Duration::from_secs(10), heard.recv())
            .await
            .expect("a change is heard within 10 s")
            .unwrap()
    };
    assert_eq!(next(&mut heard).await, RouteChange::All, "listening");
    assert!(db.routes_of(&user("eve")).await.unwrap().is_empty());
    let SpawnOutcome::Enqueued(server) = db.request_spawn(spawn_request("eve")).await.unwrap()
    else {
        panic!("enqueued");
    };
    assert_eq!(
        next(&mut heard).await,
        RouteChange::User(eve.id),
        "requested"
    );
    let routes = db.routes_of(&user("eve")).await.unwrap();
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].state, ServerState::PendingSpawn);
    assert!(routes[0].url.is_none() && routes[0].proxy_token.is_none());
    let job = server.spawn_job_id.unwrap();
    db.begin_job(job, "w").await.unwrap();
    let running = running(server.id, job);
    assert!(db.mark_running(&running).await.unwrap());
    assert_eq!(next(&mut heard).await, RouteChange::User(eve.id), "running");
    let route = &db.routes_of(&user("eve")).await.unwrap()[0];
    assert_eq!(route.state, ServerState::Running);
    assert_eq!(route.url.as_deref(), Some("http://127.0.0.1:1/"));
    assert_eq!(route.proxy_token.as_deref(), Some("proxy-secret"));
    // Traffic moves activity forward only, the owner's too.
    let later = schema::db::now() + chrono::TimeDelta::seconds(30);
    db.record_traffic(&[(server.id, later)]).await.unwrap();
    db.record_traffic(&[(server.id, later - chrono::TimeDelta::seconds(20))])
        .await
        .unwrap();
    let row = db.server_by_id(server.id).await.unwrap().unwrap();
    assert_eq!(row.last_activity, Some(later));
    let owner = db.get_user(&user("eve")).await.unwrap().unwrap();
    assert_eq!(owner.last_activity, Some(later));
    assert!(db.mark_lost(server.id, false, "gone").await.unwrap());
    assert_eq!(next(&mut heard).await, RouteChange::User(eve.id), "lost");
    let route = &db.routes_of(&user("eve")).await.unwrap()[0];
    assert_eq!(route.state, ServerState::Stopped);
    assert!(route.url.is_none() && route.proxy_token.is_none());
    stop.cancel();
    relay.await.unwrap();
}

async fn a_proxy_session_ends_with_the_session_that_handed_it_over(db: &Db) {
    let fay = db.create_user(&user("fay"), false).await.unwrap();
    let expires = chrono::Utc::now() + chrono::TimeDelta::hours(1);
    let parent = uuid::Uuid::now_v7();
    db.create_session(parent, fay.id, expires, None)
        .await
        .unwrap();
    db.create_proxy_session("cookie-1", fay.id, expires, Some(parent), None)
        .await
        .unwrap();
    db.create_proxy_session("cookie-2", fay.id, expires, None, Some("127.0.0.1"))
        .await
        .unwrap();
    let who = db.proxy_session_user("cookie-1").await.unwrap();
    assert_eq!(who.map(|u| u.name), Some("fay".to_owned()));
    assert!(
        db.session_user(parent).await.unwrap().is_some(),
        "a proxy session is no bearer token, and the parent lives on"
    );
    db.revoke_session(parent).await.unwrap();
    assert!(db.proxy_session_user("cookie-1").await.unwrap().is_none());
    assert!(db.proxy_session_user("cookie-2").await.unwrap().is_some());
    db.revoke_proxy_session("cookie-2").await.unwrap();
    assert!(db.proxy_session_user("cookie-2").await.unwrap().is_none());
    let past = chrono::Utc::now() - chrono::TimeDelta::seconds(1);
    db.create_proxy_session("cookie-3", fay.id, past, None, None)
        .await
        .unwrap();
    assert!(
        db.proxy_session_user("cookie-3").await.unwrap().is_none(),
        "expired"
    );
    db.create_proxy_session("cookie-4", fay.id, expires, None, None)
        .await
        .unwrap();
    db.set_active(&user("fay"), false).await.unwrap();
    assert!(
        db.proxy_session_user("cookie-4").await.unwrap().is_none(),
        "deactivated"
    );
}

/// One number from a statement run on the store's own database.
async fn count(db: &Db, sql: &'static str) -> i64 {
    match db_pool(db) {
        Pool::Pg(p) => sqlx::query_scalar(sql).fetch_one(&p).await.unwrap(),
        Pool::Lite(p) => sqlx::query_scalar(sql).fetch_one(&p).await.unwrap(),
    }
}

/// Concurrent spawn requests are decided together (one transaction for a batch:
/// set-wise on Postgres, a savepoint per request on the embedded store); each
/// request still gets the answer it would get alone, the limits are exact, and a
/// refused request leaves no server row behind.
async fn concurrent_spawn_requests_get_their_own_answers_and_hold_every_limit(db: &Db) {
    let db = &db.clone().with_limits(Limits {
        concurrent_spawn_limit: 10,
        active_server_limit: 10,
    });
    let users: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    for name in &users {
        db.create_user(&user(name), false).await.unwrap();
    }
    // Per user: three servers (the per-user limit is 2), the first asked twice;
    // and users that do not exist. 45 requests for a platform of 10.
    let mut asks = vec![];
    for name in &users {
        for server in ["s0", "s1", "s2", "s0"] {
            asks.push((name.clone(), server));
        }
        asks.push((format!("ghost-{name}"), "s0"));
    }
    let handles: Vec<_> = asks
        .iter()
        .map(|(name, server)| {
            let db = db.clone();
            let req = SpawnRequest {
                user: user(name),
                server: ServerName::parse(server).unwrap(),
                image: Some("berth-test-server:latest".into()),
                max_servers_per_user: Some(2),
                profile: None,
            };
            tokio::spawn(async move { db.request_spawn(req).await })
        })
        .collect();
    let mut answers = vec![];
    for handle in handles {
        answers.push(handle.await);
    }
    let (mut enqueued, mut pending, mut limited) = (vec![], vec![], 0);
    for ((name, _), answer) in asks.iter().zip(answers) {
        match answer.unwrap() {
            Ok(SpawnOutcome::Enqueued(row)) => {
                assert_eq!(row.state, ServerState::PendingSpawn);
                assert_eq!(&row.user_name, name);
                assert_eq!(row.image.as_deref(), Some("berth-test-server:latest"));
                enqueued.push(row);
            }
            Ok(SpawnOutcome::AlreadyPending(row)) => pending.push(row),
            Ok(SpawnOutcome::AlreadyRunning(row)) => panic!("nothing runs yet: {row:?}"),
            Err(StoreError::NotFound(message)) => {
                assert!(name.starts_with("ghost-"), "{name}: {message}");
                assert_eq!(message, format!("no user named {name:?}"));
            }
            Err(StoreError::Limit(message)) => {
                assert!(
                    message.contains("the most allowed per user is 2")
                        || message.contains("the platform is full: 10 of 10"),
                    "{message}"
                );
                limited += 1;
            }
            Err(e) => panic!("{name}: {e}"),
        }
    }
    assert_eq!(enqueued.len(), 10, "exactly the platform's 10 places");
    assert_eq!(enqueued.len() + pending.len() + limited, 40);
    for name in &users {
        let mine = enqueued.iter().filter(|r| &r.user_name == name).count();
        assert!(mine <= 2, "{name} has {mine} servers, at most 2 per user");
    }
    // A second request for a pending server answers with the first one's job.
    for row in &pending {
        let first = enqueued
            .iter()
            .find(|r| r.id == row.id)
            .expect("the pending server was enqueued by another request");
        assert_eq!(row.spawn_job_id, first.spawn_job_id);
    }
    let jobs: std::collections::HashSet<_> =
        enqueued.iter().map(|r| r.spawn_job_id.unwrap()).collect();
    assert_eq!(jobs.len(), 10, "one job per spawn");
    for job in &jobs {
        let row = db.get_job(*job).await.unwrap().expect("the job is there");
        assert_eq!(row.kind, JobKind::Spawn);
    }
    // Nothing of a refused request stays.
    assert_eq!(count(db, "select count(*) from servers").await, 10);
    assert_eq!(count(db, "select count(*) from jobs").await, 10);
    assert_eq!(count(db, "select count(*) from spawn_events").await, 10);
    assert_eq!(
        count(
            db,
            "select count(*) from admission_tokens where server_id is not null"
        )
        .await,
        10
    );
    if let Pool::Pg(_) = db_pool(db) {
        assert_eq!(count(db, "select count(*) from apalis.jobs").await, 10);
    }
    // Asked again later, a pending server answers with its job.
    let SpawnOutcome::AlreadyPending(again) = db
        .request_spawn(SpawnRequest {
            user: user(&enqueued[0].user_name),
            server: ServerName::parse(&enqueued[0].name).unwrap(),
            image: None,
            max_servers_per_user: Some(2),
            profile: None,
        })
        .await
        .unwrap()
    else {
        panic!("still pending");
    };
    assert_eq!(again.spawn_job_id, enqueued[0].spawn_job_id);
}

/// On a full platform a batch is answered from reads alone: every request is told
/// what it would be told by writing (its server's state, no such user, the
/// per-user or the platform limit), and nothing is written.
async fn a_full_platform_answers_every_request_as_writing_would_and_writes_nothing(db: &Db) {
    let db = &db.clone().with_limits(Limits {
        concurrent_spawn_limit: 10,
        active_server_limit: 3,
    });
    for name in ["fa", "fb", "fc", "fd"] {
        db.create_user(&user(name), false).await.unwrap();
    }
    // fa's server runs, fb's is pending, fc's is stopping: 3 of 3 places taken.
    let mut servers = vec![];
    for name in ["fa", "fb", "fc"] {
        let SpawnOutcome::Enqueued(row) = db.request_spawn(spawn_request(name)).await.unwrap()
        else {
            panic!("{name}: enqueued");
        };
        servers.push(row);
    }
    let job = servers[0].spawn_job_id.unwrap();
    assert!(db.begin_job(job, "w").await.unwrap().is_some());
    assert!(db.mark_running(&running(servers[0].id, job)).await.unwrap());
    db.request_stop(&user("fc"), &ServerName::default_server())
        .await
        .unwrap();
    let (rows, jobs) = (
        count(db, "select count(*) from servers").await,
        count(db, "select count(*) from jobs").await,
    );
    let second = |name: &str, most: u32| SpawnRequest {
        server: ServerName::parse("second").unwrap(),
        max_servers_per_user: Some(most),
        profile: None,
        ..spawn_request(name)
    };
    let asks = [
        spawn_request("fa"),
        spawn_request("fb"),
        spawn_request("fc"),
        spawn_request("fd"),
        second("fa", 1),
        second("fb", 2),
        spawn_request("ghost"),
    ];
    let handles: Vec<_> = asks
        .into_iter()
        .map(|req| {
            let db = db.clone();
            tokio::spawn(async move { db.request_spawn(req).await })
        })
        .collect();
    let mut answers = vec![];
    for handle in handles {
        answers.push(handle.await.unwrap());
    }
    let full = "the platform is full: 3 of 3 servers are active; try again when one stops";
    match &answers[0] {
        Ok(SpawnOutcome::AlreadyRunning(row)) => assert_eq!(row.id, servers[0].id),
        other => panic!("fa's running server: {other:?}"),
    }
    match &answers[1] {
        Ok(SpawnOutcome::AlreadyPending(row)) => {
            assert_eq!(row.spawn_job_id, servers[1].spawn_job_id)
        }
        other => panic!("fb's pending server: {other:?}"),
    }
    match &answers[2] {
        Err(StoreError::Conflict(m)) => assert!(m.contains("the server is stopping"), "{m}"),
        other => panic!("fc's stopping server: {other:?}"),
    }
    match &answers[3] {
        Err(StoreError::Limit(m)) => assert_eq!(m, full),
        other => panic!("fd: {other:?}"),
    }
    match &answers[4] {
        Err(StoreError::Limit(m)) => assert!(
            m.contains("already has 1 servers, the most allowed per user is 1"),
            "{m}"
        ),
        other => panic!("fa's second server, one per user: {other:?}"),
    }
    match &answers[5] {
        Err(StoreError::Limit(m)) => assert_eq!(m, full),
        other => panic!("fb's second server, two per user: {other:?}"),
    }
    match &answers[6] {
        Err(StoreError::NotFound(m)) => assert_eq!(m, "no user named \"ghost\""),
        other => panic!("no such user: {other:?}"),
    }
    assert_eq!(count(db, "select count(*) from servers").await, rows);
    assert_eq!(count(db, "select count(*) from jobs").await, jobs);
}

/// A profile's own limit holds under concurrent requests like the platform's: of
/// 12 requests for a profile of 3 places, exactly 3 spawn and the rest get the
/// profile's 429, while requests without the profile fill other places; a server
/// that ends gives its profile's place back. The server keeps the definition it
/// was requested with, whatever becomes of the profile.
async fn a_profile_s_limit_holds_under_concurrent_requests_and_its_servers_keep_their_definition(
    db: &Db,
) {
    use schema::profiles::{Profile, Profiles};
    let db = &db.clone().with_limits(Limits {
        concurrent_spawn_limit: 10,
        active_server_limit: 20,
    });
    let gpu = Profile {
        name: "gpu-small".into(),
        image: Some("lab/gpu:1".into()),
        idle_timeout: Some(60),
        max_active: Some(3),
        ..Profile::default()
    };
    db.create_profile(&gpu, "test").await.unwrap();
    let created = db.create_profile(&gpu, "test").await;
    assert!(
        matches!(created, Err(StoreError::Conflict(_))),
        "{created:?}"
    );
    let names: Vec<String> = (0..18).map(|i| format!("p{i}")).collect();
    for name in &names {
        db.create_user(&user(name), false).await.unwrap();
    }
    let handles: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let db = db.clone();
            let req = SpawnRequest {
                profile: (i % 3 != 0).then(|| gpu.clone()),
                ..spawn_request(name)
            };
            tokio::spawn(async move { db.request_spawn(req).await })
        })
        .collect();
    let (mut with_profile, mut without, mut full) = (vec![], 0, 0);
    for (i, handle) in handles.into_iter().enumerate() {
        match handle.await.unwrap() {
            Ok(SpawnOutcome::Enqueued(row)) if i % 3 != 0 => {
                assert_eq!(row.profile.as_deref(), Some("gpu-small"));
                assert_eq!(row.idle_timeout_secs, Some(60));
                with_profile.push(row);
            }
            Ok(SpawnOutcome::Enqueued(row)) => {
                assert_eq!(row.profile, None);
                without += 1;
            }
            Err(StoreError::Limit(message)) => {
                assert!(
                    message
                        .contains("profile \"gpu-small\" is full: all 3 of its places are taken"),
                    "{message}"
                );
                full += 1;
            }
            other => panic!("request {i}: {other:?}"),
        }
    }
    assert_eq!((with_profile.len(), without, full), (3, 6, 9));
    assert_eq!(
        count(db, "select count(*) from servers").await,
        9,
        "nothing refused stays"
    );
    assert_eq!(
        count(
            db,
            "select count(*) from profile_places where server_id is not null"
        )
        .await,
        3
    );

    // The profile changes and goes: the servers keep what they were given.
    db.replace_profile(
        &Profile {
            image: Some("lab/gpu:2".into()),
            ..gpu.clone()
        },
        "test",
    )
    .await
    .unwrap();
    let kept = db.server_by_id(with_profile[0].id).await.unwrap().unwrap();
    assert_eq!(
        kept.profile_definition().unwrap().image.as_deref(),
        Some("lab/gpu:1")
    );

    // One ends: its place is free for the next request of the profile.
    let first = &with_profile[0];
    assert!(
        db.mark_spawn_failed(first.id, first.spawn_job_id.unwrap(), "test")
            .await
            .unwrap()
    );
    let req = SpawnRequest {
        profile: Some(gpu.clone()),
        ..spawn_request("p0")
    };
    let again = db
        .request_spawn(SpawnRequest {
            server: ServerName::parse("second").unwrap(),
            ..req
        })
        .await;
    assert!(matches!(again, Ok(SpawnOutcome::Enqueued(_))), "{again:?}");

    assert!(db.delete_profile("gpu-small").await.unwrap());
    assert!(!db.delete_profile("gpu-small").await.unwrap());
    assert_eq!(count(db, "select count(*) from profile_places").await, 0);
    let kept = db.server_by_id(with_profile[1].id).await.unwrap().unwrap();
    assert_eq!(kept.profile.as_deref(), Some("gpu-small"));
    assert_eq!(kept.state, ServerState::PendingSpawn);
}

/// The profiles file wins at start: its profiles replace those of the same name,
/// and a profile an earlier file defined that this one does not is removed;
/// profiles made through the API stay.
async fn the_profiles_file_replaces_its_own_and_same_named_profiles(db: &Db) {
    use schema::profiles::{FileSync, Profile, Profiles};
    let made = |name: &str, image: &str| Profile {
        name: name.into(),
        image: Some(image.into()),
        ..Profile::default()
    };
    db.create_profile(&made("api-only", "a"), "admin")
        .await
        .unwrap();
    db.create_profile(&made("shared", "from-api"), "admin")
        .await
        .unwrap();
    let sync = db
        .sync_file_profiles(&[made("shared", "from-file"), made("old", "x")])
        .await
        .unwrap();
    assert_eq!(
        sync,
        FileSync {
            replaced: vec!["shared".into()],
            removed: vec![]
        }
    );
    let sync = db
        .sync_file_profiles(&[made("shared", "from-file-2")])
        .await
        .unwrap();
    assert_eq!(
        sync,
        FileSync {
            replaced: vec![],
            removed: vec!["old".into()]
        }
    );
    let rows = db.list_profiles().await.unwrap();
    let listed: Vec<(&str, &str, Option<&str>)> = rows
        .iter()
        .map(|r| {
            (
                r.profile.name.as_str(),
                r.source.as_str(),
                r.profile.image.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            ("api-only", "api", Some("a")),
            ("shared", "file", Some("from-file-2"))
        ]
    );
}

/// A provider's identity is linked by its subject, once on each side; an account
/// made with it comes with its groups; sign-ins under way are spent once, and
/// expired ones are neither taken nor kept.
async fn identities_link_once_each_side_and_sign_ins_are_spent_once(db: &Db) {
    use schema::identities::{FlowKind, OidcFlow};
    let account = |name: &str, email: &str| NewAccount {
        name: user(name),
        email: Some(email.into()),
        password_hash: None,
        role: Role::User,
    };
    let groups = vec!["physics".to_owned(), "gpu".to_owned()];
    let ann = db
        .register_identity(
            &account("ann", "ann@example.org"),
            &groups,
            "campus",
            "sub-ann",
        )
        .await
        .unwrap();
    assert_eq!(ann.groups(), groups);
    let signed_in = db
        .identity_login("campus", "sub-ann", Some("ann@new.example.org"))
        .await
        .unwrap()
        .expect("the identity leads to its account");
    assert_eq!(signed_in.id, ann.id);
    assert!(
        db.identity_login("campus", "sub-nobody", None)
            .await
            .unwrap()
            .is_none()
    );
    // The same subject at another provider is another identity.
    assert!(
        db.identity_login("other", "sub-ann", None)
            .await
            .unwrap()
            .is_none()
    );
    let taken = db
        .register_identity(
            &account("ann2", "ann2@example.org"),
            &[],
            "campus",
            "sub-ann",
        )
        .await;
    assert!(
        matches!(&taken, Err(StoreError::Conflict(m)) if m.contains("linked to another account")),
        "{taken:?}"
    );
    assert!(
        db.find_login("ann2").await.unwrap().is_none(),
        "a refused sign-up leaves no account behind"
    );
    let bob = db
        .register(&account("bob", "bob@example.org"))
        .await
        .unwrap();
    let twice = db.link_identity("campus", "sub-bob-2", ann.id, None).await;
    assert!(
        matches!(&twice, Err(StoreError::Conflict(m)) if m.contains("unlink it first")),
        "{twice:?}"
    );
    db.link_identity("campus", "sub-bob", bob.id, Some("bob@example.org"))
        .await
        .unwrap();
    let listed = db.identities_of(ann.id).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].email.as_deref(), Some("ann@new.example.org"));
    assert!(listed[0].last_login_at.is_some());
    assert!(db.unlink_identity(ann.id, "campus").await.unwrap());
    assert!(!db.unlink_identity(ann.id, "campus").await.unwrap());
    assert!(
        db.identity_login("campus", "sub-ann", None)
            .await
            .unwrap()
            .is_none()
    );

    let flow = |minutes: i64| OidcFlow {
        kind: FlowKind::Link,
        provider: "campus".into(),
        browser_hash: Some("browser".into()),
        nonce: Some("nonce".into()),
        verifier: Some("verifier".into()),
        user_id: Some(bob.id),
        return_to: Some("/admin".into()),
        expires_at: chrono::Utc::now() + chrono::TimeDelta::minutes(minutes),
    };
    db.begin_flow("live", &flow(10)).await.unwrap();
    db.begin_flow("stale", &flow(-1)).await.unwrap();
    let taken = db.take_flow("live").await.unwrap().expect("a live flow");
    assert_eq!(taken.kind, FlowKind::Link);
    assert_eq!(taken.user_id, Some(bob.id));
    assert_eq!(taken.verifier.as_deref(), Some("verifier"));
    assert!(db.take_flow("live").await.unwrap().is_none(), "spent once");
    db.begin_flow("stale-2", &flow(-1)).await.unwrap();
    assert!(db.take_flow("stale").await.unwrap().is_none(), "expired");
    let expired = db.expire_sessions().await.unwrap();
    assert_eq!(
        expired.oidc_flows, 1,
        "the expired flow nobody took is removed"
    );
}

contracts!(
    identities_link_once_each_side_and_sign_ins_are_spent_once,
    a_profile_s_limit_holds_under_concurrent_requests_and_its_servers_keep_their_definition,
    the_profiles_file_replaces_its_own_and_same_named_profiles,
    routes_follow_their_servers_and_traffic_only_moves_activity_forward,
    a_proxy_session_ends_with_the_session_that_handed_it_over,
    states_kinds_and_roles_read_back_typed_and_unknown_words_are_errors,
    a_taken_name_or_email_is_a_conflict_that_says_which,
    attempts_past_the_limit_are_refused_until_the_window_ends,
    an_sso_token_is_consumed_once_by_its_running_server,
    spawn_slots_hold_the_limit_and_go_to_the_oldest_waiter,
    limit_overrides_set_and_reset,
    a_minute_has_one_sample_and_ended_jobs_read_back,
    concurrent_spawn_requests_get_their_own_answers_and_hold_every_limit,
    a_full_platform_answers_every_request_as_writing_would_and_writes_nothing,
);

/// A request that Postgres refuses (a NUL byte in a text) fails the batch it
/// went in; the others of that batch are decided again alone and succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_postgres_refuses_fails_alone_not_its_batch() {
    let fresh = on_postgres().await;
    let db = &fresh.db.clone().with_limits(Limits {
        concurrent_spawn_limit: 10,
        active_server_limit: 10,
    });
    let names: Vec<String> = (0..8).map(|i| format!("b{i}")).collect();
    for name in &names {
        db.create_user(&user(name), false).await.unwrap();
    }
    let handles: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let db = db.clone();
            let req = SpawnRequest {
                image: (i == 3).then(|| "bad\0image".to_owned()),
                ..spawn_request(name)
            };
            tokio::spawn(async move { db.request_spawn(req).await })
        })
        .collect();
    let mut enqueued = 0;
    for (i, handle) in handles.into_iter().enumerate() {
        match handle.await.unwrap() {
            Ok(SpawnOutcome::Enqueued(_)) if i != 3 => enqueued += 1,
            Err(StoreError::Database(_)) if i == 3 => {}
            other => panic!("request {i}: {other:?}"),
        }
    }
    assert_eq!(enqueued, 7);
    assert_eq!(count(db, "select count(*) from servers").await, 7);
}
