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

fn jobs_config(root: &Path) -> String {
    format!("[jobs]\nallowed_dirs = [\"{}\"]\n", root.display())
}

async fn create(s: &Server, body: Value) -> (u16, Value) {
    json(client().post(s.url("/jobs")).json(&body).send().await.unwrap()).await
}

async fn get(s: &Server, id: &str) -> Value {
    json(client().get(s.url(&format!("/jobs/{id}"))).send().await.unwrap()).await.1
}

/// The `data:` payloads of an SSE stream, until it ends.
async fn sse_events(s: &Server, id: &str) -> Vec<Value> {
    let mut res = client().get(s.url(&format!("/jobs/{id}/events"))).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(120), res.chunk()).await.unwrap().unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text.lines().filter_map(|l| l.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect()
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

/// An upload that was being received when the server died is removed when it starts again.
#[tokio::test]
async fn uploads_left_by_a_dead_server_are_removed_at_start() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("jobs");
    let leftover = dir.join(".uploads").join("0123456789abcdef.zip");
    std::fs::create_dir_all(leftover.parent().unwrap()).unwrap();
    std::fs::write(&leftover, vec![7u8; 4096]).unwrap();
    let _s = Server::start_with_env(
        &tiny_config(""),
        &[
            ("LABELFOOL_JOBS__DATABASE", state.path().join("jobs.sqlite3").to_str().unwrap()),
            ("LABELFOOL_JOBS__DIR", dir.to_str().unwrap()),
        ],
    );
    assert!(!leftover.exists(), "the unfinished upload is still there");
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
        let png = client().get(s.url(l["png"].as_str().unwrap())).send().await.unwrap().bytes().await.unwrap();
        let png = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap();
        assert_eq!((png.width(), png.height()), (upload.width(), upload.height()));
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
    c.engine.device = "cpu".into();
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
