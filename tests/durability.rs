//! Durability as the README promises it: a server killed with SIGKILL at 20 random points while
//! a job writes its results loses nothing and tears nothing. After each kill, read straight from
//! the SQLite database and the folder: every result row that names a PNG has it, and it decodes
//! whole; what the kill left half-done (`*.part` temporaries, PNGs whose row never committed) is
//! gone once the next server has started; at the end every job finished with every image
//! exactly once.

mod common;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const KILLS: usize = 20;
const METHODS: [&str; 1] = ["fgsm"];

/// The sample images, each under a few names: a job long enough to be killed in the middle.
fn images_dir(root: &Path, copies: usize) -> (PathBuf, Vec<String>) {
    let dir = root.join("images");
    std::fs::create_dir_all(&dir).unwrap();
    let mut names = Vec::new();
    for path in sample_images() {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        for i in 0..copies {
            let name = format!("{stem}_{i}.JPEG");
            std::fs::copy(&path, dir.join(&name)).unwrap();
            names.push(name);
        }
    }
    names.sort();
    (dir, names)
}

fn start(root: &Path, state: &Path) -> Server {
    let config = tiny_config(&format!("[jobs]\nallowed_dirs = [\"{}\"]\n", root.display()));
    let (db, dir) = (state.join("jobs.sqlite3"), state.join("jobs"));
    Server::start_with_env(
        &config,
        &[("LABELFOOL_JOBS__DATABASE", db.to_str().unwrap()), ("LABELFOOL_JOBS__DIR", dir.to_str().unwrap())],
    )
}

async fn create(s: &Server, images: &Path) -> String {
    let body = json!({"images": images, "methods": METHODS, "models": ["tiny"]});
    let (status, job) = json(client().post(s.url("/jobs")).json(&body).send().await.unwrap()).await;
    assert_eq!(status, 201, "{job}");
    job["id"].as_str().unwrap().to_string()
}

async fn job(s: &Server, id: &str) -> Value {
    json(client().get(s.url(&format!("/jobs/{id}"))).send().await.unwrap()).await.1
}

/// Files under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let kind = e.file_type().unwrap();
        if kind.is_dir() {
            out.extend(files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// With the server dead: every row that names a PNG has it, whole (decoded; each file once per
/// size and inode). Returns what the kill left behind — temporaries and PNGs no row names — with
/// their inodes, which the next start must remove.
fn check_dead(state: &Path, checked: &mut HashSet<(PathBuf, u64, u64)>) -> Vec<(PathBuf, u64)> {
    let dir = state.join("jobs");
    let c = rusqlite::Connection::open(state.join("jobs.sqlite3")).unwrap();
    let mut st = c.prepare("SELECT job_id, png FROM results WHERE png IS NOT NULL").unwrap();
    let named: HashSet<PathBuf> = st
        .query_map([], |r| Ok(dir.join(r.get::<_, String>(0)?).join(r.get::<_, String>(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for png in &named {
        let meta = std::fs::metadata(png).unwrap_or_else(|e| panic!("a result row's PNG is missing: {png:?}: {e}"));
        if checked.insert((png.clone(), meta.ino(), meta.len())) {
            let bytes = std::fs::read(png).unwrap();
            image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
                .unwrap_or_else(|e| panic!("a result row's PNG is torn: {png:?}: {e}"));
        }
    }
    files(&dir)
        .into_iter()
        .filter(|f| {
            let ext = f.extension().and_then(|e| e.to_str());
            ext == Some("part")
                || (ext == Some("png") && f.to_string_lossy().contains("/images/") && !named.contains(f))
        })
        .map(|f| {
            let ino = std::fs::metadata(&f).unwrap().ino();
            (f, ino)
        })
        .collect()
}

#[tokio::test]
async fn a_job_killed_at_twenty_random_points_loses_and_tears_nothing() {
    let started = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let (images, names) = images_dir(root.path(), 4);
    let state = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(29);
    let mut s = start(root.path(), state.path());
    let mut jobs = vec![create(&s, &images).await];
    let mut checked = HashSet::new();
    let mut left_behind = 0;
    for kill in 0..KILLS {
        // A job is always writing when the kill comes: a new one once the last is done.
        let last = job(&s, jobs.last().unwrap()).await;
        if last["state"] == "done" {
            jobs.push(create(&s, &images).await);
        }
        let delay = Duration::from_millis(rng.random_range(5..1000));
        tokio::time::sleep(delay).await;
        let done = job(&s, jobs.last().unwrap()).await["done"].clone();
        s.kill();
        let leftovers = check_dead(state.path(), &mut checked);
        left_behind += leftovers.len();
        eprintln!("kill {kill}: after {delay:?}, {done} done, {} left half-done", leftovers.len());
        s = start(root.path(), state.path());
        for (path, ino) in leftovers {
            // Gone, or (a PNG the resumed job has written again since) another file.
            let same = std::fs::metadata(&path).is_ok_and(|m| m.ino() == ino);
            assert!(!same, "{path:?}, left by the kill, survived the start");
        }
    }
    eprintln!("{KILLS} kills, {left_behind} half-done files swept, {} jobs", jobs.len());

    // Let the jobs finish: each has every image under every method, once.
    for id in &jobs {
        let waited = Instant::now();
        let job = loop {
            let job = job(&s, id).await;
            if job["state"] == "done" {
                break job;
            }
            assert!(job["state"] == "queued" || job["state"] == "running", "{job}");
            assert!(waited.elapsed() < Duration::from_secs(120), "{job}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let total = (names.len() * METHODS.len()) as u64;
        assert_eq!((job["done"].as_u64(), job["total"].as_u64()), (Some(total), Some(total)), "{job}");
        let text = client().get(s.url(&format!("/jobs/{id}/results"))).send().await.unwrap().text().await.unwrap();
        let mut seen: HashMap<(String, String), usize> = HashMap::new();
        for l in text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()) {
            *seen.entry((l["method"].as_str().unwrap().into(), l["file"].as_str().unwrap().into())).or_default() += 1;
        }
        for m in METHODS {
            for n in &names {
                assert_eq!(seen.get(&(m.to_string(), n.clone())), Some(&1), "{m} {n} in job {id}");
            }
        }
        assert_eq!(seen.len() as u64, total);
    }
    s.kill();
    let leftovers = check_dead(state.path(), &mut checked);
    assert!(leftovers.is_empty(), "finished jobs left {leftovers:?}");
    eprintln!("took {:?}", started.elapsed());
}
