//! Durable jobs (`/jobs`): an eval of a folder run in the background, followed over Server-Sent
//! Events, its results, PNGs and report downloadable; cancellation; and a server killed with
//! SIGKILL in the middle of a job that loses no finished image and resumes (or marks the job
//! interrupted) after a restart.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn images_dir(root: &Path, n: usize) -> PathBuf {
    let dir = root.join("images");
    std::fs::create_dir_all(&dir).unwrap();
    for path in sample_images().iter().take(n) {
        std::fs::copy(path, dir.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

/// A folder `named` under `root` of four pictures named as the tiny model classifies them: a
/// job on it can make a study (its sources count as correctly classified).
async fn named_dir(s: &Server, root: &Path) -> PathBuf {
    let dir = root.join("named");
    std::fs::create_dir_all(&dir).unwrap();
    copy_named_as_classified(s, "", &dir, &sample_images()[..4]).await;
    dir
}

fn jobs_config(root: &Path) -> String {
    format!("[jobs]\nallowed_dirs = [\"{}\"]\n", root.display())
}

async fn create(s: &Server, body: Value) -> (u16, Value) {
    json(client().post(s.url("/jobs")).json(&body).send().await.unwrap()).await
}

async fn get(s: &Server, id: &str) -> Value {
    json(client().get(s.url(&format!("/jobs/{id}"))).send().await.unwrap()).await.1
}

#[tokio::test]
async fn a_job_runs_in_the_background_and_everything_it_made_can_be_downloaded() {
    let root = tempfile::tempdir().unwrap();
    let images = images_dir(root.path(), 3);
    let s = Server::start(&tiny_config(&jobs_config(root.path())));

    // Refused before anything is stored.
    let outside = tempfile::tempdir().unwrap();
    let (status, v) = create(&s, json!({"images": outside.path()})).await;
    assert_eq!((status, v["error"]["code"].as_str()), (403, Some("forbidden")), "{v}");
    let (status, v) = create(&s, json!({"images": images, "methods": ["nope"]})).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("methods")), "{v}");
    let (status, v) = create(&s, json!({"images": images, "models": ["nope"]})).await;
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("unknown_model")), "{v}");
    let (status, v) = create(&s, json!({"images": root.path().join("missing")})).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("images")), "{v}");
    let (status, v) = create(&s, json!({"images": images, "colour": "blue"})).await;
    assert!(status == 400 || status == 422, "{status} {v}");

    let (status, job) =
        create(&s, json!({"images": images, "methods": ["labelfool", "deepfool"], "models": ["tiny"]})).await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["total"], 6);
    assert!(job["state"] == "queued" || job["state"] == "running", "{job}");

    // Followed to the end over SSE: counts only grow, the last event says done.
    let events = sse_events(&s, &id).await;
    assert!(!events.is_empty());
    let counts: Vec<u64> = events.iter().map(|e| e["done"].as_u64().unwrap()).collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    let last = events.last().unwrap();
    assert_eq!((last["state"].as_str(), last["done"].as_u64()), (Some("done"), Some(6)), "{events:?}");

    let job = get(&s, &id).await;
    assert_eq!((job["state"].as_str(), job["done"].as_u64()), (Some("done"), Some(6)), "{job}");
    let list = json(client().get(s.url("/jobs")).send().await.unwrap()).await.1;
    assert!(list.as_array().unwrap().iter().any(|j| j["id"] == id.as_str()));

    // Every result, and each delivered PNG at the upload's size.
    let res = client().get(s.url(&format!("/jobs/{id}/results"))).send().await.unwrap();
    assert_eq!(res.headers()["content-type"], "application/x-ndjson");
    let text = res.text().await.unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 6);
    for l in &lines {
        let png_url = l["png"].as_str().unwrap_or_else(|| panic!("no PNG: {l}"));
        let bytes = client().get(s.url(png_url)).send().await.unwrap().bytes().await.unwrap();
        let png = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap();
        let upload = image::open(images.join(l["file"].as_str().unwrap())).unwrap();
        assert_eq!((png.width(), png.height()), (upload.width(), upload.height()));
        assert_eq!(l["record"]["width"].as_u64(), Some(u64::from(upload.width())), "{l}");
        assert!(l["record"]["perceptibility"].is_number(), "{l}");
        // The record's success is the PNG's: re-classified by the server, it is what the record says.
        assert_delivered(&s, l["model"].as_str(), &bytes, &l["record"], &format!("job result {l}")).await;
    }
    // The report, rendered from the stored records.
    let report = client().get(s.url(&format!("/jobs/{id}/files/report/tiny/report.md"))).send().await.unwrap();
    assert_eq!(report.status(), 200);
    assert!(report.text().await.unwrap().contains("LabelFool evaluation"));
    let summary: Value = client()
        .get(s.url(&format!("/jobs/{id}/files/report/tiny/summary.json")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(summary["methods"].as_array().unwrap().len(), 2, "{summary}");
    // Nothing outside the job's folder.
    for bad in ["%2E%2E/jobs.sqlite3", "..%2Fjobs.sqlite3", "report/../../jobs.sqlite3"] {
        let res = client().get(s.url(&format!("/jobs/{id}/files/{bad}"))).send().await.unwrap();
        assert_eq!(res.status(), 404, "{bad}");
    }
    // A method or model named twice runs once.
    let (status, twice) = create(
        &s,
        json!({"images": images, "methods": ["fgsm", "labelfool", "fgsm"], "models": ["tiny", "tiny"], "limit": 1}),
    )
    .await;
    assert_eq!(status, 201, "{twice}");
    assert_eq!(
        (twice["total"].as_u64(), twice["spec"]["methods"].as_array().map(Vec::len)),
        (Some(2), Some(2)),
        "{twice}"
    );
    let events = sse_events(&s, twice["id"].as_str().unwrap()).await;
    assert_eq!(events.last().unwrap()["done"], 2, "{events:?}");
    // A finished job cannot be cancelled; an unknown one is 404.
    let (status, _) = json(client().delete(s.url(&format!("/jobs/{id}"))).send().await.unwrap()).await;
    assert_eq!(status, 409);
    let (status, v) = json(client().get(s.url("/jobs/0000000000000000")).send().await.unwrap()).await;
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("unknown_job")));
}

#[tokio::test]
async fn a_cancelled_job_stops_and_keeps_what_it_finished() {
    let root = tempfile::tempdir().unwrap();
    let images = images_dir(root.path(), 12);
    let s = Server::start(&tiny_config(&jobs_config(root.path())));
    // A long job first, so the second waits in the queue behind it.
    let (_, long) = create(&s, json!({"images": images, "models": ["tiny"]})).await;
    let (_, queued) = create(&s, json!({"images": images, "models": ["tiny"], "methods": ["fgsm"]})).await;
    let (long, queued) = (long["id"].as_str().unwrap().to_string(), queued["id"].as_str().unwrap().to_string());
    // The second job's 12 items wait behind the first's 48.
    assert!(pending_items(&s).await >= 12.0);
    let (status, v) = json(client().delete(s.url(&format!("/jobs/{queued}"))).send().await.unwrap()).await;
    assert_eq!((status, v["state"].as_str()), (200, Some("cancelled")), "{v}");
    let (status, _) = json(client().delete(s.url(&format!("/jobs/{long}"))).send().await.unwrap()).await;
    assert_eq!(status, 200);
    let started = Instant::now();
    let job = loop {
        let job = get(&s, &long).await;
        if job["state"] == "cancelled" {
            break job;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let done = job["done"].as_u64().unwrap();
    assert!(done < 48, "cancelled at once, not after every attack: {job}");
    let lines = client().get(s.url(&format!("/jobs/{long}/results"))).send().await.unwrap().text().await.unwrap();
    assert_eq!(lines.lines().count() as u64, done);
    // The queued one never ran.
    assert_eq!(get(&s, &queued).await["done"], 0);
    assert_eq!(pending_items(&s).await, 0.0, "a cancelled job's items wait for nobody");
}

/// `labelfool_job_items_pending` from `/metrics`.
async fn pending_items(s: &Server) -> f64 {
    gauge(s, "labelfool_job_items_pending").await
}

/// A gauge `name` from `/metrics`.
async fn gauge(s: &Server, name: &str) -> f64 {
    let text = client().get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// SIGKILL in the middle of a job: after a restart every finished image's result is still there,
/// and the job is marked interrupted (`jobs.resume = false`) or resumed where it stopped (the
/// default) without doing a finished image twice.
#[tokio::test]
async fn a_job_survives_a_killed_server() {
    let root = tempfile::tempdir().unwrap();
    let images = images_dir(root.path(), 12);
    let state = tempfile::tempdir().unwrap();
    let db = state.path().join("jobs.sqlite3");
    let dir = state.path().join("jobs");
    let env = |resume: &'static str| {
        vec![
            ("LABELFOOL_JOBS__DATABASE", db.to_str().unwrap().to_string()),
            ("LABELFOOL_JOBS__DIR", dir.to_str().unwrap().to_string()),
            ("LABELFOOL_JOBS__RESUME", resume.to_string()),
        ]
    };
    let start = |resume: &'static str| {
        let e = env(resume);
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Server::start_with_env(&default_model_config(&jobs_config(root.path())), &e)
    };
    // Kill once at least two images are stored (EfficientNet-Lite0: seconds per attack).
    let kill_midway = |s: Server, id: String| async move {
        let started = Instant::now();
        let done = loop {
            let job = get(&s, &id).await;
            let done = job["done"].as_u64().unwrap();
            if done >= 2 {
                break done;
            }
            assert!(started.elapsed() < Duration::from_secs(300), "{job}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        s.kill();
        done
    };
    let body = json!({"images": images, "methods": ["labelfool", "fgsm"]});

    // 1. resume = false: the job is marked interrupted, its finished images kept.
    let s = start("true");
    let (status, job) = create(&s, body.clone()).await;
    assert_eq!(status, 201, "{job}");
    let a = job["id"].as_str().unwrap().to_string();
    let seen = kill_midway(s, a.clone()).await;
    let s = start("false");
    let job = get(&s, &a).await;
    assert_eq!(job["state"], "interrupted", "{job}");
    assert!(job["done"].as_u64().unwrap() >= seen, "a finished image was lost: saw {seen}, now {job}");
    assert!(job["done"].as_u64().unwrap() < 24, "{job}");
    let lines = client().get(s.url(&format!("/jobs/{a}/results"))).send().await.unwrap().text().await.unwrap();
    for l in lines.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()) {
        if let Some(png) = l["png"].as_str() {
            let res = client().get(s.url(png)).send().await.unwrap();
            assert_eq!(res.status(), 200, "{l}");
            // A PNG kept across the kill is the image its record describes.
            let bytes = res.bytes().await.unwrap();
            assert_delivered(&s, l["model"].as_str(), &bytes, &l["record"], &format!("kept result {l}")).await;
        }
    }

    // 2. resume = true (the default): the job goes on where it stopped and finishes.
    let (_, job) = create(&s, body.clone()).await;
    let b = job["id"].as_str().unwrap().to_string();
    let seen = kill_midway(s, b.clone()).await;
    let s = start("true");
    let job = get(&s, &b).await;
    assert!(job["done"].as_u64().unwrap() >= seen, "saw {seen}, now {job}");
    assert_eq!(job["resumed"], 1, "{job}");
    let events = sse_events(&s, &b).await;
    assert_eq!(events.last().unwrap()["state"], "done", "{events:?}");
    let job = get(&s, &b).await;
    assert_eq!((job["done"].as_u64(), job["total"].as_u64()), (Some(24), Some(24)), "{job}");
    let lines = client().get(s.url(&format!("/jobs/{b}/results"))).send().await.unwrap().text().await.unwrap();
    let keys: std::collections::HashSet<(String, String)> = lines
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|l| (l["method"].as_str().unwrap().to_string(), l["file"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(keys.len(), 24, "every image under every method, once");
    // The interrupted job stays as it was.
    assert_eq!(get(&s, &a).await["state"], "interrupted");
}

/// An image whose attack kills its server (SIGKILL while it is under way, as an out-of-memory
/// kill would) `jobs.max_attempts` times is not tried again: a third server stores an error
/// record in its place, attacks the job's other item and finishes the job.
#[tokio::test]
async fn an_item_that_kills_its_server_each_time_is_given_up_and_the_job_goes_on() {
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    // A photo of 6.75 MP: an attack at its size takes seconds, so a kill lands in the middle.
    let zebra = image::load_from_memory(&read_fixture("images/n02391049_zebra.JPEG")).unwrap();
    zebra
        .resize_exact(3000, 2250, image::imageops::FilterType::Triangle)
        .to_rgb8()
        .save(images.join("zebra.jpg"))
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let (db, dir) = (state.path().join("jobs.sqlite3"), state.path().join("jobs"));
    let env = [("LABELFOOL_JOBS__DATABASE", db.to_str().unwrap()), ("LABELFOOL_JOBS__DIR", dir.to_str().unwrap())];
    let config = default_model_config(&format!("{}concurrency = 1\nmax_attempts = 2\n", jobs_config(root.path())));
    let start = || Server::start_with_env(&config, &env);

    let mut s = start();
    let (status, job) = create(&s, json!({"images": images, "methods": ["labelfool", "fgsm"]})).await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    for attempt in 1..=2 {
        // Killed once its first item (LabelFool on the photo) is claimed and under way.
        let started = Instant::now();
        while gauge(&s, "labelfool_job_items_held").await < 1.0 {
            assert!(started.elapsed() < Duration::from_secs(60), "attempt {attempt}: nothing claimed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.kill();
        s = start();
    }
    let (_, job) = wait_until(&s, &id, |_, j| j["state"] != "running" && j["state"] != "queued").await;
    assert_eq!((job["state"].as_str(), job["done"].as_u64()), (Some("done"), Some(2)), "{job}");
    let lines = client().get(s.url(&format!("/jobs/{id}/results"))).send().await.unwrap().text().await.unwrap();
    let results: Vec<Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let by = |m: &str| results.iter().find(|r| r["method"] == m).unwrap_or_else(|| panic!("no {m} in {results:?}"));
    let error = by("labelfool")["record"]["error"].as_str().unwrap_or_default().to_string();
    // (A LabelFool result here would mean an attack ended before its kill.)
    assert!(error.contains("not tried again") && error.contains("2 earlier attempts"), "{results:?}");
    assert!(by("labelfool")["png"].is_null());
    assert!(by("fgsm")["record"]["error"].is_null() && by("fgsm")["png"].is_string(), "{:?}", by("fgsm"));
}

/// A zip of `files` (name, bytes), stored uncompressed.
fn zip_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    use std::io::Write;
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in files {
        z.start_file(name.as_str(), opts).unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap().into_inner()
}

/// What a server killed in the middle of its work left is swept when it starts again: an upload
/// being received, an archive's half-unpacked folder (no job row), temporaries, a PNG whose row
/// never committed — and a row whose PNG is gone is removed, its job queued again to redo it.
#[tokio::test]
async fn uploads_left_by_a_dead_server_are_removed_at_start() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("jobs");
    let db = state.path().join("jobs.sqlite3");
    let env = [("LABELFOOL_JOBS__DATABASE", db.to_str().unwrap()), ("LABELFOOL_JOBS__DIR", dir.to_str().unwrap())];
    // A finished job, with its rows and PNGs.
    let s = Server::start_with_env(&tiny_config(""), &env);
    let (status, job) = upload(&s, zip_of(&batch(2)), Some(r#"{"methods": ["fgsm"], "models": ["tiny"]}"#)).await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(sse_events(&s, &id).await.last().unwrap()["state"], "done");
    s.kill();

    let leftover = dir.join(".uploads").join("0123456789abcdef.zip");
    std::fs::create_dir_all(leftover.parent().unwrap()).unwrap();
    std::fs::write(&leftover, vec![7u8; 4096]).unwrap();
    let half_unpacked = dir.join("fedcba9876543210").join("input");
    std::fs::create_dir_all(&half_unpacked).unwrap();
    std::fs::write(half_unpacked.join("n01440764_x.JPEG"), b"half").unwrap();
    let pngs: Vec<String> = {
        let c = rusqlite::Connection::open(&db).unwrap();
        let mut st = c.prepare("SELECT png FROM results WHERE job_id = ?1 AND png IS NOT NULL ORDER BY file").unwrap();
        st.query_map([&id], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    assert_eq!(pngs.len(), 2, "{pngs:?}");
    let job_dir = dir.join(&id);
    let images = job_dir.join(&pngs[0]).parent().unwrap().to_path_buf();
    let part = images.join("n01440764_x.png.0123456789abcdef.part");
    std::fs::write(&part, b"\x89PNG half").unwrap();
    let no_row = images.join("n99999999_no_row.png");
    std::fs::copy(job_dir.join(&pngs[1]), &no_row).unwrap();
    let gone = job_dir.join(&pngs[0]);
    std::fs::remove_file(&gone).unwrap();

    let s = Server::start_with_env(&tiny_config(""), &env);
    assert!(!leftover.exists(), "the unfinished upload is still there");
    assert!(!dir.join("fedcba9876543210").exists(), "the half-unpacked archive is still there");
    assert!(!part.exists(), "a temporary survived the start");
    assert!(!no_row.exists(), "a PNG no row names survived the start");
    // The image whose PNG was lost is done again, once.
    let events = sse_events(&s, &id).await;
    assert_eq!(events.last().unwrap()["state"], "done", "{events:?}");
    let job = get(&s, &id).await;
    assert_eq!((job["done"].as_u64(), job["resumed"].as_u64()), (Some(2), Some(1)), "{job}");
    assert!(gone.is_file(), "the lost PNG was not made again");
}

/// Two servers started with the default configuration on one host (jobs under the same
/// `LABELFOOL_CACHE`) both serve, and a job posted to one is worked by both: each claims the
/// job's items from the shared SQLite file. Either serves every result and PNG.
#[tokio::test]
async fn two_default_servers_on_one_host_share_a_job() {
    let cache = tempfile::tempdir().unwrap();
    let env = [("LABELFOOL_CACHE", cache.path().to_str().unwrap())];
    let a = Server::start_default(&tiny_config(""), &env);
    let b = Server::start_default(&tiny_config(""), &env);
    let db = cache.path().join("jobs/jobs.sqlite3");
    assert!(db.is_file(), "not the default database");
    let (status, job) =
        upload(&a, zip_of(&batch(12)), Some(r#"{"methods": ["labelfool", "fgsm"], "models": ["tiny"]}"#)).await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    // Followed on the server it was not posted to.
    let events = sse_events(&b, &id).await;
    assert_eq!(events.last().unwrap()["state"], "done", "{events:?}");
    let per_server: Vec<i64> = {
        let c = rusqlite::Connection::open(&db).unwrap();
        let mut st = c
            .prepare("SELECT COUNT(*) FROM work_items WHERE job_id = ?1 AND kind = 'attack' GROUP BY done_by")
            .unwrap();
        st.query_map([&id], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    eprintln!("items done per server: {per_server:?}");
    assert_eq!((per_server.len(), per_server.iter().sum::<i64>()), (2, 24), "every item once, by both: {per_server:?}");
    let lines = |s: &Server| {
        let url = s.url(&format!("/jobs/{id}/results"));
        async move { client().get(url).send().await.unwrap().text().await.unwrap() }
    };
    let (from_a, from_b) = (lines(&a).await, lines(&b).await);
    assert_eq!(from_a, from_b);
    assert_eq!(from_a.lines().count(), 24);
    for l in from_a.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()) {
        if let Some(png) = l["png"].as_str() {
            let get = |s: &Server| client().get(s.url(png)).send();
            let (ra, rb) = (get(&a).await.unwrap(), get(&b).await.unwrap());
            assert_eq!((ra.status().as_u16(), rb.status().as_u16()), (200, 200), "{l}");
            assert_eq!(ra.bytes().await.unwrap(), rb.bytes().await.unwrap(), "{l}");
        }
    }
}

/// `n` sample images as archive entries under `batch/`.
fn batch(n: usize) -> Vec<(String, Vec<u8>)> {
    sample_images()
        .iter()
        .take(n)
        .map(|p| (format!("batch/{}", p.file_name().unwrap().to_string_lossy()), std::fs::read(p).unwrap()))
        .collect()
}

/// `POST /jobs` with an archive and an optional spec.
async fn upload(s: &Server, archive: Vec<u8>, spec: Option<&str>) -> (u16, Value) {
    let mut form = reqwest::multipart::Form::new()
        .part("archive", reqwest::multipart::Part::bytes(archive).file_name("images.zip"));
    if let Some(spec) = spec {
        form = form.text("spec", spec.to_string());
    }
    json(client().post(s.url("/jobs")).multipart(form).send().await.unwrap()).await
}

#[tokio::test]
async fn a_job_runs_on_an_uploaded_zip_of_images() {
    // No allowed_dirs: an upload needs none. A small archive limit, to see it enforced.
    let s = Server::start(&tiny_config("[jobs]\nmax_archive_bytes = 400000\nmax_unpacked_bytes = 400000\n"));
    let files: Vec<(String, Vec<u8>)> = sample_images()
        .iter()
        .take(2)
        .map(|p| (format!("batch/{}", p.file_name().unwrap().to_string_lossy()), std::fs::read(p).unwrap()))
        .collect();
    let archive = zip_of(&files);
    assert!(archive.len() < 400_000, "fixture too big for the test's limit: {}", archive.len());
    let form = |bytes: Vec<u8>, spec: Option<&str>| {
        let mut f = reqwest::multipart::Form::new()
            .part("archive", reqwest::multipart::Part::bytes(bytes).file_name("images.zip"));
        if let Some(s) = spec {
            f = f.text("spec", s.to_string());
        }
        f
    };
    let post = |f: reqwest::multipart::Form| client().post(s.url("/jobs")).multipart(f).send();
    let (status, job) =
        json(post(form(archive.clone(), Some(r#"{"methods": ["fgsm"], "models": ["tiny"]}"#))).await.unwrap()).await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["total"], 2, "{job}");
    let events = sse_events(&s, &id).await;
    assert_eq!(events.last().unwrap()["state"], "done", "{events:?}");
    let text = client().get(s.url(&format!("/jobs/{id}/results"))).send().await.unwrap().text().await.unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for (l, (name, bytes)) in lines.iter().zip(&files) {
        assert_eq!(l["file"].as_str(), Some(name.as_str()), "{l}");
        let upload = image::load_from_memory(bytes).unwrap();
        let bytes = client().get(s.url(l["png"].as_str().unwrap())).send().await.unwrap().bytes().await.unwrap();
        let png = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap();
        assert_eq!((png.width(), png.height()), (upload.width(), upload.height()));
        assert_delivered(&s, l["model"].as_str(), &bytes, &l["record"], &format!("job result {l}")).await;
    }
    // The unpacked images are the job's own files.
    let res = client().get(s.url(&format!("/jobs/{id}/files/input/{}", files[0].0))).send().await.unwrap();
    assert_eq!(res.bytes().await.unwrap().as_ref(), files[0].1.as_slice());

    // Refused: not a zip, a name leaving the folder, too many bytes, a spec naming a folder, no archive.
    let (status, v) = json(post(form(b"not a zip".to_vec(), None)).await.unwrap()).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("archive")), "{v}");
    let (status, v) = json(post(form(zip_of(&[("../x.JPEG".into(), b"x".to_vec())]), None)).await.unwrap()).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("archive")), "{v}");
    let big = zip_of(&[("big.JPEG".into(), vec![7u8; 500_000])]);
    let res = post(form(big, None)).await.unwrap();
    assert_eq!(res.status(), 413);
    let (status, v) = json(post(form(archive.clone(), Some(r#"{"images": "/etc"}"#))).await.unwrap()).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("spec")), "{v}");
    let only_spec = reqwest::multipart::Form::new().text("spec", "{}");
    let (status, v) = json(post(only_spec).await.unwrap()).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("archive")), "{v}");
    // Nothing refused is left behind, and the refused jobs were never created.
    let list = json(client().get(s.url("/jobs")).send().await.unwrap()).await.1;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

/// Following a missing job (404) or one that has finished leaves no progress channel behind:
/// without pruning, every such request kept one for the life of the server.
#[tokio::test]
async fn progress_channels_nobody_follows_are_not_kept() {
    use labelfool::config::{Config, ModelConfig};
    let state = tempfile::tempdir().unwrap();
    let mut c = Config::default();
    c.engine.device = labelfool::config::DeviceSpec::Cpu;
    c.models.push(ModelConfig::bundle("tiny", &models_dir().join("tiny").to_string_lossy()));
    c.jobs.database = state.path().join("jobs.sqlite3").to_string_lossy().into_owned();
    c.jobs.dir = state.path().join("jobs").to_string_lossy().into_owned();
    c.validate().unwrap();
    let (engine, startup) =
        labelfool::engine::Engine::start(&c, labelfool::model::Catalog::from_config(&c).unwrap()).unwrap();
    tokio::task::spawn_blocking(move || startup.wait()).await.unwrap().unwrap();
    let jobs = labelfool::jobs::Jobs::start(engine.clone(), &c.jobs).await.unwrap();
    for i in 0..100 {
        drop(jobs.subscribe(&format!("missing{i}")));
    }
    let followed = jobs.subscribe("followed");
    assert_eq!(jobs.event_channels(), 1, "only the followed job keeps a channel");
    drop(followed);
    drop(jobs.subscribe("another"));
    assert_eq!(jobs.event_channels(), 1, "the unfollowed channels went at the next subscription");
    engine.shutdown();
}

/// Polls a job until `done(job)` holds (within two minutes).
async fn wait_until(s: &Server, id: &str, done: impl Fn(u16, &Value) -> bool) -> (u16, Value) {
    let started = Instant::now();
    loop {
        let (status, job) = json(client().get(s.url(&format!("/jobs/{id}"))).send().await.unwrap()).await;
        if done(status, &job) {
            return (status, job);
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{status} {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server keeping its jobs in `state` (so that a test can look at them and restart on them).
fn start_in(config: &str, state: &Path) -> Server {
    let (db, dir) = (state.join("jobs.sqlite3"), state.join("jobs"));
    Server::start_with_env(
        config,
        &[("LABELFOOL_JOBS__DATABASE", db.to_str().unwrap()), ("LABELFOOL_JOBS__DIR", dir.to_str().unwrap())],
    )
}

/// Outside `jobs.allowed_dirs` a path gets the same 403 whether it exists or not (nothing there
/// is looked at); inside, a link to a file outside refuses the job, and one that appears after
/// the job was created fails it when it runs: a job never reads a file outside.
#[tokio::test]
async fn links_and_paths_outside_the_allowed_folders_are_refused_alike() {
    let root = tempfile::tempdir().unwrap();
    let images = images_dir(root.path(), 12);
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("n01440764_secret.JPEG");
    std::fs::copy(&sample_images()[0], &secret).unwrap();
    let s = Server::start(&tiny_config(&jobs_config(root.path())));

    let (a, existing) = create(&s, json!({"images": outside.path()})).await;
    let (b, missing) = create(&s, json!({"images": outside.path().join("missing")})).await;
    assert_eq!((a, existing["error"]["code"].as_str()), (403, Some("forbidden")), "{existing}");
    assert_eq!((b, missing["error"]["code"].as_str()), (403, Some("forbidden")), "{missing}");
    let (status, v) = create(&s, json!({"images": format!("{}/../etc", root.path().display())})).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("images")), "{v}");

    // A link to a file outside, and a folder that is a link outside.
    let linked = root.path().join("linked");
    std::fs::create_dir(&linked).unwrap();
    std::fs::copy(&sample_images()[1], linked.join(sample_images()[1].file_name().unwrap())).unwrap();
    std::os::unix::fs::symlink(&secret, linked.join("n01440764_link.JPEG")).unwrap();
    let (status, v) = create(&s, json!({"images": linked, "models": ["tiny"]})).await;
    assert_eq!((status, v["error"]["code"].as_str()), (403, Some("forbidden")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("n01440764_link.JPEG"), "{v}");
    std::os::unix::fs::symlink(outside.path(), root.path().join("away")).unwrap();
    let (status, v) = create(&s, json!({"images": root.path().join("away"), "models": ["tiny"]})).await;
    assert_eq!(status, 403, "{v}");

    // A link planted while the job waits behind a long one.
    let later = root.path().join("later");
    std::fs::create_dir(&later).unwrap();
    std::fs::copy(&sample_images()[2], later.join(sample_images()[2].file_name().unwrap())).unwrap();
    let (_, long) = create(&s, json!({"images": images, "models": ["tiny"]})).await;
    let (status, job) = create(&s, json!({"images": later, "models": ["tiny"], "methods": ["fgsm"]})).await;
    assert_eq!(status, 201, "{job}");
    std::os::unix::fs::symlink(&secret, later.join("n01440764_late.JPEG")).unwrap();
    let id = job["id"].as_str().unwrap();
    client().delete(s.url(&format!("/jobs/{}", long["id"].as_str().unwrap()))).send().await.unwrap();
    let (_, job) = wait_until(&s, id, |_, j| j["state"] != "queued" && j["state"] != "running").await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap().contains("n01440764_late.JPEG"), "{job}");
    assert_eq!(job["done"], 0, "{job}");
}

/// Files a job serves back never run in a browser: `nosniff` on all, and an uploaded SVG or
/// HTML is a download, not a page.
#[tokio::test]
async fn job_files_are_served_with_nosniff_and_uploads_as_downloads() {
    let s = Server::start(&tiny_config(""));
    let mut files = batch(1);
    let svg = br#"<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>"#.to_vec();
    files.push(("batch/evil.svg".into(), svg.clone()));
    files.push(("batch/page.html".into(), b"<script>alert(2)</script>".to_vec()));
    let (status, job) = upload(&s, zip_of(&files), Some(r#"{"methods": ["fgsm"], "models": ["tiny"]}"#)).await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(sse_events(&s, &id).await.last().unwrap()["state"], "done");
    let text = client().get(s.url(&format!("/jobs/{id}/results"))).send().await.unwrap().text().await.unwrap();
    let png = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find_map(|l| l["png"].as_str().map(String::from))
        .unwrap_or_else(|| panic!("no PNG: {text}"));
    let cases = [
        (format!("/jobs/{id}/files/input/batch/evil.svg"), "application/octet-stream", true),
        (format!("/jobs/{id}/files/input/batch/page.html"), "application/octet-stream", true),
        (png, "image/png", false),
        (format!("/jobs/{id}/files/report/tiny/report.md"), "text/markdown", false),
        (format!("/jobs/{id}/files/report/tiny/summary.json"), "application/json", false),
    ];
    for (url, mime, attachment) in cases {
        let res = client().get(s.url(&url)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{url}");
        let h = res.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{url}");
        assert!(h["content-type"].to_str().unwrap().starts_with(mime), "{url}: {:?}", h["content-type"]);
        assert_eq!(h.get("content-disposition").is_some_and(|v| v == "attachment"), attachment, "{url}");
    }
    let res = client().get(s.url(&format!("/jobs/{id}/files/input/batch/evil.svg"))).send().await.unwrap();
    assert_eq!(res.bytes().await.unwrap().as_ref(), svg.as_slice());
}

/// A JSON job is a path and a few names: its body is read within 64 KiB whatever the route's
/// (archive-sized) limit, announced or not.
#[tokio::test]
async fn a_json_job_body_is_bounded_small() {
    let s = Server::start(&tiny_config(""));
    let big = serde_json::to_vec(&json!({"images": format!("/{}", "x".repeat(100_000))})).unwrap();
    let (status, v) = json(
        client()
            .post(s.url("/jobs"))
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 413, "{v}");
    assert!(v["error"]["code"].is_string(), "{v}");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big.chunks(8192).map(|c| Ok(c.to_vec())).collect();
    let res = client()
        .post(s.url("/jobs"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    let (status, v) = json(res).await;
    assert_eq!(status, 413, "{v}");
    assert!(v["error"]["code"].is_string(), "{v}");
}

/// `jobs.max_total_bytes`: an upload that would pass it is refused (507, naming the key) —
/// at once when its length says so, as soon as the bytes that arrived say so otherwise, and
/// when it unpacks to more than is left; a JSON job is refused once the folder is over it.
#[tokio::test]
async fn the_jobs_folder_quota_refuses_new_jobs_and_uploads_past_it() {
    let root = tempfile::tempdir().unwrap();
    let images = images_dir(root.path(), 1);
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("jobs");
    let s = start_in(&tiny_config(&format!("{}max_total_bytes = 300000\n", jobs_config(root.path()))), state.path());
    let refused = |status: u16, v: &Value| {
        assert_eq!((status, v["error"]["code"].as_str()), (507, Some("quota_exceeded")), "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("jobs.max_total_bytes"), "{v}");
    };
    // No length announced: stopped once the bytes that arrived pass what is left.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..8).map(|_| Ok(vec![0u8; 50_000])).collect();
    let part = reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .file_name("images.zip");
    let form = reqwest::multipart::Form::new().part("archive", part);
    let (status, v) = json(client().post(s.url("/jobs")).multipart(form).send().await.unwrap()).await;
    refused(status, &v);
    // Announced: refused before it is read.
    let (status, v) = upload(&s, zip_of(&[("big.JPEG".into(), vec![7u8; 400_000])]), None).await;
    refused(status, &v);
    // Small as sent, big unpacked.
    let bomb = {
        use std::io::Write;
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        z.start_file("n01440764_bomb.JPEG", opts).unwrap();
        z.write_all(&vec![0u8; 1 << 20]).unwrap();
        z.finish().unwrap().into_inner()
    };
    let (status, v) = upload(&s, bomb, None).await;
    refused(status, &v);
    let held: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(held.iter().all(|n| n == ".uploads"), "refused uploads left {held:?}");
    assert_eq!(std::fs::read_dir(dir.join(".uploads")).map_or(0, |d| d.count()), 0);

    // Under the quota a JSON job runs; once the folder is over it, nothing new is taken.
    let (status, job) = create(&s, json!({"images": images, "methods": ["fgsm"], "models": ["tiny"]})).await;
    assert_eq!(status, 201, "{job}");
    sse_events(&s, job["id"].as_str().unwrap()).await;
    std::fs::write(dir.join("filler.bin"), vec![0u8; 300_000]).unwrap();
    let (status, v) = create(&s, json!({"images": images, "methods": ["fgsm"], "models": ["tiny"]})).await;
    refused(status, &v);
    let (status, v) = upload(&s, zip_of(&batch(1)), None).await;
    refused(status, &v);
    let list = json(client().get(s.url("/jobs")).send().await.unwrap()).await.1;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

/// `DELETE /jobs/{id}?purge=true` deletes a job for good — a finished one, or a running one after
/// cancelling it — rows, results and folder; refused while a study uses the job. Without it,
/// `DELETE` still only cancels.
#[tokio::test]
async fn a_job_can_be_purged_with_everything_it_made() {
    let root = tempfile::tempdir().unwrap();
    let images = images_dir(root.path(), 12);
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("jobs");
    let s = start_in(&tiny_config(&jobs_config(root.path())), state.path());
    let delete = |id: &str, query: &str| client().delete(s.url(&format!("/jobs/{id}{query}"))).send();

    let small = json!({"images": images, "methods": ["fgsm"], "models": ["tiny"], "limit": 3});
    let (_, done) = create(&s, small).await;
    let done = done["id"].as_str().unwrap().to_string();
    assert_eq!(sse_events(&s, &done).await.last().unwrap()["state"], "done");
    assert!(dir.join(&done).is_dir());
    assert_eq!(delete(&done, "").await.unwrap().status(), 409, "a finished job is not cancelled");
    let (status, v) = json(delete(&done, "?purge=maybe").await.unwrap()).await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(delete(&done, "?purge=true").await.unwrap().status(), 204);
    let (status, _) = json(client().get(s.url(&format!("/jobs/{done}"))).send().await.unwrap()).await;
    assert_eq!(status, 404);
    assert!(!dir.join(&done).exists(), "the purged job's folder is still there");
    assert_eq!(std::fs::read_dir(&images).unwrap().count(), 12, "the source folder is not the job's");
    assert_eq!(delete(&done, "?purge=true").await.unwrap().status(), 404);

    // Running: cancelled, then deleted once it no longer writes.
    let (_, running) = create(&s, json!({"images": images, "models": ["tiny"]})).await;
    let running = running["id"].as_str().unwrap().to_string();
    wait_until(&s, &running, |_, j| j["done"].as_u64() > Some(0)).await;
    assert_eq!(delete(&running, "?purge=true").await.unwrap().status(), 204);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!dir.join(&running).exists(), "the purged job's folder came back");

    // Used by a study: 409 naming it.
    let named = named_dir(&s, root.path()).await;
    let (_, used) = create(&s, json!({"images": named, "methods": ["fgsm"], "models": ["tiny"]})).await;
    let used = used["id"].as_str().unwrap().to_string();
    sse_events(&s, &used).await;
    let (status, study) =
        json(client().post(s.url("/studies")).json(&json!({"job": used, "name": "keep me"})).send().await.unwrap())
            .await;
    assert_eq!(status, 201, "{study}");
    let (status, v) = json(delete(&used, "?purge=true").await.unwrap()).await;
    assert_eq!((status, v["error"]["code"].as_str()), (409, Some("conflict")), "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(study["id"].as_str().unwrap()) && message.contains("keep me"), "{v}");
    assert_eq!(get(&s, &used).await["state"], "done");

    s.kill();
    let c = rusqlite::Connection::open(state.path().join("jobs.sqlite3")).unwrap();
    for id in [&done, &running] {
        let rows: i64 = c
            .query_row(
                "SELECT (SELECT COUNT(*) FROM jobs WHERE id = ?1) + (SELECT COUNT(*) FROM results WHERE job_id = ?1)",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rows, 0, "job {id} left rows");
    }
}

/// `jobs.retention_days`: finished jobs older than it are purged at start-up and then
/// periodically; a job a study uses is kept. (A fraction of a day, to see it in a test.)
#[tokio::test]
async fn finished_jobs_past_their_retention_are_purged() {
    let root = tempfile::tempdir().unwrap();
    let images = images_dir(root.path(), 3);
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("jobs");
    let config = |days: &str| tiny_config(&format!("{}retention_days = {days}\n", jobs_config(root.path())));
    let body = json!({"images": images, "methods": ["fgsm"], "models": ["tiny"]});
    let s = start_in(&config("0"), state.path());
    let (_, old) = create(&s, body.clone()).await;
    let named = named_dir(&s, root.path()).await;
    let (_, studied) = create(&s, json!({"images": named, "methods": ["fgsm"], "models": ["tiny"]})).await;
    let (old, studied) = (old["id"].as_str().unwrap().to_string(), studied["id"].as_str().unwrap().to_string());
    sse_events(&s, &old).await;
    sse_events(&s, &studied).await;
    let (status, v) = json(client().post(s.url("/studies")).json(&json!({"job": studied})).send().await.unwrap()).await;
    assert_eq!(status, 201, "{v}");
    s.kill();
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // 0.00001 days: 0.864 s.
    let s = start_in(&config("0.00001"), state.path());
    let (status, _) = json(client().get(s.url(&format!("/jobs/{old}"))).send().await.unwrap()).await;
    assert_eq!(status, 404, "purged at start-up");
    assert!(!dir.join(&old).exists());
    assert_eq!(get(&s, &studied).await["state"], "done", "a study's job is kept");
    let (_, new) = create(&s, body.clone()).await;
    let new = new["id"].as_str().unwrap().to_string();
    sse_events(&s, &new).await;
    wait_until(&s, &new, |status, _| status == 404).await;
    // The rows go first, then the folder.
    let gone = Instant::now();
    while dir.join(&new).exists() {
        assert!(gone.elapsed() < Duration::from_secs(10), "the expired job's folder stays");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&s, &studied).await["state"], "done");
}
