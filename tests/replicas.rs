//! Several servers, one body of work, on a real PostgreSQL (a throwaway cluster per test, from
//! Debian's `postgresql` package): replicas share one job's items and serve every result; a
//! replica killed mid-job loses nothing and doubles nothing; a database outage makes replicas
//! not ready, leaves nothing half-written, and the job goes on when the database is back.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pg::PgCluster;
use common::*;
use serde_json::{Value, json};

/// Each fixture under five names: 60 images.
fn images_dir(root: &Path) -> PathBuf {
    let dir = root.join("images");
    std::fs::create_dir_all(&dir).unwrap();
    for path in sample_images() {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        for i in 0..5 {
            std::fs::copy(&path, dir.join(format!("{stem}_{i}.JPEG"))).unwrap();
        }
    }
    dir
}

/// A replica: the tiny models, one libtorch thread (results must not depend on the split of a
/// reduction), jobs in `database` and the shared folder `dir`, a 3 s lease.
fn replica(root: &Path, database: &str, dir: &Path) -> Server {
    let config = tiny_config(&format!(
        "[engine]\ndevice = \"cpu\"\nthreads = 1\n[jobs]\nallowed_dirs = [\"{}\"]\nlease_secs = 3\npoll_ms = 100\n",
        root.display()
    ));
    Server::start_with_env(
        &config,
        &[("LABELFOOL_JOBS__DATABASE", database), ("LABELFOOL_JOBS__DIR", dir.to_str().unwrap())],
    )
}

/// A throwaway cluster, a database `jobs` in it (its DSN), and `n` replicas on it sharing the
/// jobs folder `root/jobs`.
fn on_postgres(root: &Path, n: usize) -> (PgCluster, String, Vec<Server>) {
    let cluster = PgCluster::start();
    let dsn = cluster.database("jobs");
    let shared = root.join("jobs");
    let replicas = (0..n).map(|_| replica(root, &dsn, &shared)).collect();
    (cluster, dsn, replicas)
}

async fn create(s: &Server, images: &Path, methods: &[&str]) -> String {
    let body = json!({"images": images, "methods": methods, "models": ["tiny"]});
    let (status, job) = json(client().post(s.url("/jobs")).json(&body).send().await.unwrap()).await;
    assert_eq!(status, 201, "{job}");
    job["id"].as_str().unwrap().to_string()
}

async fn job(s: &Server, id: &str) -> (u16, Value) {
    json(client().get(s.url(&format!("/jobs/{id}"))).send().await.unwrap()).await
}

/// Polls until the job is done (within `limit`).
async fn wait_done(s: &Server, id: &str, limit: Duration) -> Value {
    let started = Instant::now();
    loop {
        let (status, j) = job(s, id).await;
        if status == 200 && j["state"] == "done" {
            return j;
        }
        assert!(status == 503 || j["state"] == "queued" || j["state"] == "running", "{status} {j}");
        assert!(started.elapsed() < limit, "not done after {limit:?}: {j}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn results(s: &Server, id: &str) -> String {
    client().get(s.url(&format!("/jobs/{id}/results"))).send().await.unwrap().text().await.unwrap()
}

/// (method, file) → (target index, success, perceptibility) of a job's results.
fn outcomes(lines: &str) -> BTreeMap<(String, String), (Value, Value, f64)> {
    lines
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|l| {
            let r = &l["record"]["result"];
            (
                (l["method"].as_str().unwrap().to_string(), l["file"].as_str().unwrap().to_string()),
                (r["target"]["index"].clone(), r["success"].clone(), r["perceptibility"].as_f64().unwrap_or(f64::NAN)),
            )
        })
        .collect()
}

async fn sql(dsn: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

async fn count(db: &tokio_postgres::Client, query: &str, job: &str) -> i64 {
    db.query_one(query, &[&job]).await.unwrap().get(0)
}

/// Three replicas on one database run one job of 60 images × 2 methods to the end, each doing
/// part of it; the results equal one SQLite server's on the same images, and every replica
/// serves every result and PNG.
#[tokio::test]
#[ignore = "partner tier: PostgreSQL (scripts/test runs it)"]
async fn three_replicas_share_a_job_and_match_one_sqlite_server() {
    let root = tempfile::tempdir().unwrap();
    let images = images_dir(root.path());
    let (_cluster, dsn, replicas) = on_postgres(root.path(), 3);
    let id = create(&replicas[0], &images, &["fgsm", "labelfool"]).await;
    // Followed on another replica than the one it was posted to.
    let events = sse_events(&replicas[2], &id).await;
    assert_eq!(events.last().unwrap()["state"], "done", "{events:?}");
    let db = sql(&dsn).await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM results WHERE job_id = $1", &id).await, 120);
    assert_eq!(
        count(&db, "SELECT COUNT(DISTINCT done_by) FROM work_items WHERE job_id = $1 AND kind = 'attack'", &id).await,
        3,
        "every replica worked"
    );
    let lines = results(&replicas[0], &id).await;
    for r in &replicas[1..] {
        assert_eq!(results(r, &id).await, lines, "replicas disagree on the results");
    }
    for l in lines.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()) {
        if let Some(png) = l["png"].as_str() {
            let mut bodies = HashSet::new();
            for r in &replicas {
                let res = client().get(r.url(png)).send().await.unwrap();
                assert_eq!(res.status().as_u16(), 200, "{l}");
                bodies.insert(res.bytes().await.unwrap());
            }
            assert_eq!(bodies.len(), 1, "{png} differs between replicas");
        }
    }
    drop(replicas);

    // The same job on one server with the default SQLite store.
    let alone = replica(root.path(), root.path().join("alone.sqlite3").to_str().unwrap(), &root.path().join("alone"));
    let solo = create(&alone, &images, &["fgsm", "labelfool"]).await;
    wait_done(&alone, &solo, Duration::from_secs(300)).await;
    let (shared_out, solo_out) = (outcomes(&lines), outcomes(&results(&alone, &solo).await));
    assert_eq!(shared_out.len(), 120);
    assert_eq!(shared_out.keys().collect::<Vec<_>>(), solo_out.keys().collect::<Vec<_>>());
    for (key, (target, success, p)) in &shared_out {
        let (t, s, q) = &solo_out[key];
        assert_eq!((target, success), (t, s), "{key:?}");
        assert!((p - q).abs() <= 1e-6 || (p.is_nan() && q.is_nan()), "{key:?}: perceptibility {p} against {q}");
    }
}

/// A replica killed with SIGKILL mid-job: the items it held are done by the others once its
/// lease runs out; no item is lost or done twice, and the job ends `done`.
#[tokio::test]
#[ignore = "partner tier: PostgreSQL (scripts/test runs it)"]
async fn a_replica_killed_mid_job_loses_and_doubles_nothing() {
    let root = tempfile::tempdir().unwrap();
    let images = images_dir(root.path());
    let (_cluster, dsn, mut replicas) = on_postgres(root.path(), 3);
    let id = create(&replicas[0], &images, &["labelfool"]).await;
    let db = sql(&dsn).await;
    // Kill replica 1 while it holds items.
    let victim = replicas.remove(1);
    let pid = i64::from(victim.pid());
    let started = Instant::now();
    let held: Vec<i64> = loop {
        let rows = db
            .query(
                "SELECT w.id FROM work_items w JOIN instances i ON i.id = w.owner \
                 WHERE w.state = 'leased' AND i.pid = $1",
                &[&pid],
            )
            .await
            .unwrap();
        if !rows.is_empty() {
            break rows.iter().map(|r| r.get(0)).collect();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "replica 1 never held an item");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    victim.kill();
    let done = wait_done(&replicas[0], &id, Duration::from_secs(300)).await;
    assert_eq!((done["done"].as_u64(), done["total"].as_u64()), (Some(60), Some(60)), "{done}");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM results WHERE job_id = $1", &id).await, 60, "a row lost or doubled");
    let distinct = count(&db, "SELECT COUNT(DISTINCT (model, method, file)) FROM results WHERE job_id = $1", &id).await;
    assert_eq!(distinct, 60);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM work_items WHERE job_id = $1 AND state != 'done'", &id).await, 0);
    for item in held {
        let row =
            db.query_one("SELECT state, attempts, done_by FROM work_items WHERE id = $1", &[&item]).await.unwrap();
        let (state, attempts, by): (String, i64, Option<String>) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(state, "done");
        // Claimed again after the kill (unless the victim had finished it just before).
        assert!(attempts >= 2 || by.is_some(), "item {item}: {attempts} attempts");
    }
    let retried = count(&db, "SELECT COUNT(*) FROM work_items WHERE job_id = $1 AND attempts >= 2", &id).await;
    assert!(retried >= 1, "nothing the dead replica held was claimed again");
}

/// PostgreSQL stopped for 10 s mid-job: replicas say they are not ready and answer 503
/// `database_unavailable`; nothing half-written is left; when it is back they are ready again
/// and the job ends `done` with every image once.
#[tokio::test]
#[ignore = "partner tier: PostgreSQL (scripts/test runs it)"]
async fn replicas_ride_out_a_database_outage() {
    let root = tempfile::tempdir().unwrap();
    let images = images_dir(root.path());
    let (cluster, dsn, replicas) = on_postgres(root.path(), 2);
    let id = create(&replicas[0], &images, &["labelfool"]).await;
    let started = Instant::now();
    while job(&replicas[0], &id).await.1["done"].as_u64().unwrap_or(0) < 3 {
        assert!(started.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.stop();
    let down = Instant::now();
    for r in &replicas {
        let ready = loop {
            let status = client().get(r.url("/ready")).send().await.unwrap().status().as_u16();
            if status == 503 || down.elapsed() > Duration::from_secs(5) {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(ready, 503, "a replica stayed ready without its database");
        let (status, body) = job(r, &id).await;
        assert_eq!((status, body["error"]["code"].as_str()), (503, Some("database_unavailable")), "{body}");
    }
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down.elapsed())).await;
    cluster.start_server();
    for r in &replicas {
        let back = Instant::now();
        while client().get(r.url("/ready")).send().await.unwrap().status() != 200 {
            assert!(back.elapsed() < Duration::from_secs(20), "not ready again after the database came back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let done = wait_done(&replicas[1], &id, Duration::from_secs(300)).await;
    assert_eq!((done["done"].as_u64(), done["total"].as_u64()), (Some(60), Some(60)), "{done}");
    let db = sql(&dsn).await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM results WHERE job_id = $1", &id).await, 60);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM work_items WHERE job_id = $1 AND state = 'leased'", &id).await, 0);
    // Every row's PNG is in place, whole.
    for l in results(&replicas[0], &id).await.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()) {
        if let Some(png) = l["png"].as_str() {
            let bytes = client().get(replicas[0].url(png)).send().await.unwrap().bytes().await.unwrap();
            image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).expect("a torn PNG");
        }
    }
}

/// One schema history: three servers migrating a fresh PostgreSQL database at once apply each
/// version once, and every table has the columns its SQLite twin has (PostgreSQL's observers
/// add `seq`, where SQLite's queries break ties on `rowid`).
#[tokio::test]
#[ignore = "partner tier: PostgreSQL (scripts/test runs it)"]
async fn both_stores_share_one_schema_history() {
    let cluster = PgCluster::start();
    let dsn = cluster.database("jobs");
    let opened = futures::future::join_all((0..3).map(|_| labelfool::jobs::Store::open(&dsn, 2))).await;
    assert!(opened.iter().all(Result::is_ok), "a concurrent migration failed");
    let db = sql(&dsn).await;
    let history: Vec<i64> = db
        .query("SELECT version FROM labelfool_schema ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(history, (1..=6).collect::<Vec<i64>>());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.sqlite3");
    labelfool::jobs::Store::open(path.to_str().unwrap(), 1).await.unwrap();
    let lite = rusqlite::Connection::open(&path).unwrap();
    let tables: Vec<String> = {
        let mut st = lite.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").unwrap();
        st.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    assert!(tables.len() >= 9, "{tables:?}");
    for table in tables {
        let mut st = lite.prepare(&format!("SELECT name FROM pragma_table_info('{table}') ORDER BY name")).unwrap();
        let lite_cols: Vec<String> = st.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
        let pg_cols: Vec<String> = db
            .query(
                "SELECT column_name::text FROM information_schema.columns WHERE table_name = $1 ORDER BY 1",
                &[&table],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .filter(|c: &String| !(table == "observers" && c == "seq"))
            .collect();
        assert_eq!(lite_cols, pg_cols, "table {table}");
    }
}

/// Human studies on PostgreSQL: a study made on one replica is answered through the other (an
/// observer's link works on any replica), observers added at once get their own names (the
/// study's row is locked while one is placed), and both replicas report the same results.
#[tokio::test]
#[ignore = "partner tier: PostgreSQL (scripts/test runs it)"]
async fn a_study_on_postgres_is_answered_through_any_replica() {
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let (_cluster, _, replicas) = on_postgres(root.path(), 2);
    let (a, b) = (&replicas[0], &replicas[1]);
    copy_named_as_classified(a, "", &images, &sample_images()[..4]).await;
    let job = create(a, &images, &["fgsm"]).await;
    wait_done(a, &job, Duration::from_secs(120)).await;
    let post = |s: &Server, path: String, body: Value| {
        let req = client().post(s.url(&path)).json(&body);
        async move { json(req.send().await.unwrap()).await }
    };
    let (status, study) = post(a, "/studies".into(), json!({"job": job, "observers": 2})).await;
    assert_eq!(status, 201, "{study}");
    let id = study["id"].as_str().unwrap().to_string();
    let path = format!("/studies/{id}/observers");
    let dups = futures::future::join_all((0..6).map(|i| {
        let s = if i % 2 == 0 { a } else { b };
        post(s, path.clone(), json!({"name": "dup"}))
    }))
    .await;
    let created: Vec<u16> = dups.iter().map(|(s, _)| *s).collect();
    assert_eq!(created.iter().filter(|&&s| s == 201).count(), 1, "{dups:?}");
    assert!(created.iter().all(|&s| s == 201 || s == 409), "{dups:?}");
    let (_, study) = json(client().get(a.url(&format!("/studies/{id}"))).send().await.unwrap()).await;
    let observers = study["observers"].as_array().unwrap().clone();
    assert_eq!(observers.len(), 3, "{study}");
    let mut answered = 0;
    for (n, o) in observers.iter().enumerate() {
        let token = o["token"].as_str().unwrap();
        let (status, mut session) =
            json(client().get(b.url(&format!("/observe/{token}/session"))).send().await.unwrap()).await;
        assert_eq!(status, 200, "{session}");
        while let Some(p) = session["puzzle"].as_object().cloned() {
            let answer = if (n + answered) % 2 == 0 { "correct" } else { "incorrect" };
            let body = json!({"puzzle": p["id"], "answer": answer});
            let (status, next) = post(b, format!("/observe/{token}/answers"), body.clone()).await;
            assert_eq!(status, 200, "{next}");
            // The first answer stands, on either replica.
            let (status, _) = post(a, format!("/observe/{token}/answers"), body).await;
            assert_eq!(status, 409);
            answered += 1;
            session = next;
        }
    }
    assert!(answered > 0);
    let results = |s: &Server| client().get(s.url(&format!("/studies/{id}/results"))).send();
    let (from_a, from_b) =
        (results(a).await.unwrap().text().await.unwrap(), results(b).await.unwrap().text().await.unwrap());
    assert_eq!(from_a, from_b);
    let csv = client().get(b.url(&format!("/studies/{id}/answers.csv"))).send().await.unwrap().text().await.unwrap();
    assert_eq!(csv.lines().count(), answered + 1, "{csv}");
    let (_, listed) = json(client().get(b.url("/studies")).send().await.unwrap()).await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let status = client().delete(b.url(&format!("/studies/{id}"))).send().await.unwrap().status();
    assert_eq!(status.as_u16(), 204);
    let (status, _) = json(client().get(a.url(&format!("/studies/{id}"))).send().await.unwrap()).await;
    assert_eq!(status, 404);
}

/// Cancelling a job on one replica stops the other's items of it within a lease: none is held
/// any more, and no result is stored after the cancellation.
#[tokio::test]
#[ignore = "partner tier: PostgreSQL (scripts/test runs it)"]
async fn a_job_cancelled_on_one_replica_stops_on_every_replica() {
    let root = tempfile::tempdir().unwrap();
    let images = images_dir(root.path());
    let (_cluster, dsn, replicas) = on_postgres(root.path(), 2);
    let id = create(&replicas[0], &images, &["labelfool"]).await;
    let db = sql(&dsn).await;
    let started = Instant::now();
    // Both replicas hold items of the job.
    while count(&db, "SELECT COUNT(DISTINCT owner) FROM work_items WHERE job_id = $1 AND state = 'leased'", &id).await
        < 2
    {
        assert!(started.elapsed() < Duration::from_secs(60), "the replicas never both held items");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = client().delete(replicas[1].url(&format!("/jobs/{id}"))).send().await.unwrap().status();
    assert_eq!(status.as_u16(), 200);
    let stored = count(&db, "SELECT COUNT(*) FROM results WHERE job_id = $1", &id).await;
    let cancelled = Instant::now();
    while count(&db, "SELECT COUNT(*) FROM work_items WHERE job_id = $1 AND state = 'leased'", &id).await > 0 {
        assert!(cancelled.elapsed() < Duration::from_secs(3), "items still held a lease after the cancel");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM results WHERE job_id = $1", &id).await, stored);
    let (_, j) = job(&replicas[0], &id).await;
    assert_eq!((j["state"].as_str(), j["done"].as_i64()), (Some("cancelled"), Some(stored)), "{j}");
}
