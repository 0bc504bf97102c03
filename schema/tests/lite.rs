//! The embedded store on a real SQLite file: its queue, the one-process lock, and
//! archiving (the parts the end-to-end suite does not reach on SQLite).

use std::{io::Read, path::PathBuf, time::Duration};

use chrono::{TimeDelta, Utc};
use schema::{
    JobOutcome, Maintenance, ServerName, SpawnOutcome, SpawnRequest, SqliteStore, Store, UserName,
    jobs::SPAWN_QUEUE, maintenance::ArchiveTable,
};

/// A data directory of the test's own, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("lite-{name}-{:08x}", rand_suffix()));
        Self(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    nanos ^ std::process::id()
}

async fn spawn(store: &SqliteStore, user: &str) -> uuid::Uuid {
    let name = UserName::parse(user).unwrap();
    let db = schema::Db::from(store.clone()).with_limits(schema::Limits {
        concurrent_spawn_limit: 10,
        active_server_limit: 100,
    });
    db.create_user(&name, false).await.unwrap();
    let outcome = db
        .request_spawn(SpawnRequest {
            user: name,
            server: ServerName::default_server(),
            image: None,
            max_servers_per_user: None,
            profile: None,
        })
        .await
        .unwrap();
    let SpawnOutcome::Enqueued(server) = outcome else {
        panic!("not enqueued: {outcome:?}");
    };
    server.spawn_job_id.unwrap()
}

#[tokio::test]
async fn the_queue_hands_out_oldest_first_holds_back_retries_and_survives_a_restart() {
    let dir = Dir::new("queue");
    let store = SqliteStore::open(&dir.0).await.unwrap();
    let jobs = [
        spawn(&store, "q-one").await,
        spawn(&store, "q-two").await,
        spawn(&store, "q-three").await,
    ];

    let first = store.take(SPAWN_QUEUE, 2, "w").await.unwrap();
    let ids: Vec<_> = first.iter().map(|d| d.envelope.job_id).collect();
    assert_eq!(ids, jobs[..2], "oldest first, at most as many as asked");
    assert!(first.iter().all(|d| d.delivery == 1));
    // Taken jobs are not handed out twice.
    let rest = store.take(SPAWN_QUEUE, 10, "w").await.unwrap();
    assert_eq!(
        rest.iter().map(|d| d.envelope.job_id).collect::<Vec<_>>(),
        jobs[2..]
    );

    store.ack(jobs[0]).await.unwrap();
    store
        .hand_back(jobs[1], Duration::from_secs(60), Some("boom"))
        .await
        .unwrap();
    assert!(
        store.take(SPAWN_QUEUE, 10, "w").await.unwrap().is_empty(),
        "a job handed back with a delay waits it out"
    );

    // A restart (a new store on the same file, once the first is gone) hands out
    // what the dead process had taken, as a further delivery.
    drop(store);
    let store = SqliteStore::open(&dir.0).await.unwrap();
    assert_eq!(store.release_taken().await.unwrap(), 1);
    let again = store.take(SPAWN_QUEUE, 10, "w").await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].envelope.job_id, jobs[2]);
    assert_eq!(again[0].delivery, 2);
}

#[tokio::test]
async fn a_second_store_on_the_same_directory_is_refused() {
    let dir = Dir::new("lock");
    let store = SqliteStore::open(&dir.0).await.unwrap();
    let second = SqliteStore::open(&dir.0).await;
    let Err(e) = second else {
        panic!("a second store opened the same directory");
    };
    assert!(e.to_string().contains("another Berth process"), "{e}");
    drop(store);
    SqliteStore::open(&dir.0)
        .await
        .expect("free again once the first is gone");
}

#[tokio::test]
async fn archiving_moves_old_finished_jobs_to_day_files_once() {
    let dir = Dir::new("archive");
    let store = SqliteStore::open(&dir.0).await.unwrap();
    let mut ended = vec![];
    for user in ["a-one", "a-two", "a-three"] {
        let job = spawn(&store, user).await;
        schema::Db::from(store.clone())
            .finish_job(job, &JobOutcome::Succeeded)
            .await
            .unwrap();
        ended.push(job);
    }
    let open = spawn(&store, "a-open").await;
    // Two of them finished long ago, on two days.
    for (job, days) in [(ended[0], 100), (ended[1], 101)] {
        sqlx::query("update jobs set finished_at = $2 where id = $1")
            .bind(job)
            .bind(Utc::now() - TimeDelta::days(days))
            .execute(store.pool())
            .await
            .unwrap();
    }
    let out = dir.0.join("archive");
    let before = Utc::now() - TimeDelta::days(90);
    let moved = schema::Db::from(store.clone())
        .archive(ArchiveTable::Jobs, before, &out)
        .await
        .unwrap();
    assert_eq!(moved, 2);
    let left: Vec<(uuid::Uuid,)> = sqlx::query_as("select id from jobs order by id")
        .fetch_all(store.pool())
        .await
        .unwrap();
    let mut expected = vec![ended[2], open];
    expected.sort();
    assert_eq!(
        left.into_iter().map(|(id,)| id).collect::<Vec<_>>(),
        expected
    );

    let mut lines = vec![];
    for file in std::fs::read_dir(out.join("jobs")).unwrap() {
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(std::fs::File::open(file.unwrap().path()).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        lines.extend(text.lines().map(str::to_owned));
    }
    assert_eq!(lines.len(), 2, "one file per day, one line per job");
    for line in &lines {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(row["state"], "succeeded");
        assert!(
            ended[..2].iter().any(|id| row["id"] == id.to_string()),
            "{row}"
        );
    }
    assert_eq!(
        schema::Db::from(store.clone())
            .archive(ArchiveTable::Jobs, before, &out)
            .await
            .unwrap(),
        0,
        "nothing is archived twice"
    );
}
