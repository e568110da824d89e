//! Human studies (`/studies`, `/observe/{token}`) over HTTP: a study made of a finished job,
//! groups that never hold two puzzles of the same source, observers answering through their
//! links without the API key, CR and PG equal to a hand computation from the stored answers,
//! the CSV and chart, everything still there after a restart, and deleted with its folder.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const KEY: &str = "study-key";

struct Api<'a> {
    s: &'a Server,
}

impl Api<'_> {
    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        json(req.send().await.unwrap()).await
    }
    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(client().get(self.s.url(path)).bearer_auth(KEY)).await
    }
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(client().post(self.s.url(path)).bearer_auth(KEY).json(&body)).await
    }
    /// An observer's call: no API key.
    async fn observe(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        match body {
            Some(b) => self.send(client().post(self.s.url(path)).json(&b)).await,
            None => self.send(client().get(self.s.url(path))).await,
        }
    }
    /// Posts a job (201 expected) and waits until it is done: its id.
    async fn finished_job(&self, body: Value) -> String {
        let (status, job) = self.post("/jobs", body).await;
        assert_eq!(status, 201, "{job}");
        let id = job["id"].as_str().unwrap().to_string();
        self.wait_done(&id).await;
        id
    }
    /// Posts a study of `job` with the defaults (201 expected): its id and body.
    async fn study_of(&self, job: &str) -> (String, Value) {
        let (status, study) = self.post("/studies", json!({"job": job})).await;
        assert_eq!(status, 201, "{study}");
        (study["id"].as_str().unwrap().to_string(), study)
    }
    async fn wait_done(&self, id: &str) {
        let started = Instant::now();
        loop {
            let (_, job) = self.get(&format!("/jobs/{id}")).await;
            if job["state"] == "done" {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(300), "{job}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn config(root: &Path) -> String {
    tiny_config(&format!("[server]\napi_key = \"{KEY}\"\n[jobs]\nallowed_dirs = [\"{}\"]\n", root.display()))
}

/// CR = misjudged / answered; PG = (CR − CR_clean) / CR_clean, by hand.
fn cr_pg(answers: &[(String, bool, bool)]) -> HashMap<String, (f64, Option<f64>)> {
    let mut counts: HashMap<String, (f64, f64)> = HashMap::new();
    for (category, truth, said_correct) in answers {
        let c = counts.entry(category.clone()).or_default();
        c.0 += 1.0;
        if said_correct != truth {
            c.1 += 1.0;
        }
    }
    let clean = counts.get("clean").map(|(n, m)| m / n);
    counts
        .into_iter()
        .map(|(k, (n, m))| {
            let cr = m / n;
            let pg = match clean {
                Some(b) if b > 0.0 && k != "clean" => Some((cr - b) / b),
                _ => None,
            };
            (k, (cr, pg))
        })
        .collect()
}

fn close(got: &Value, want: Option<f64>, what: &str) {
    match want {
        Some(w) => assert!((got.as_f64().unwrap_or(f64::NAN) - w).abs() < 1e-9, "{what}: {got} vs {w}"),
        None => assert!(got.is_null(), "{what}: {got} vs none"),
    }
}

#[tokio::test]
async fn a_study_of_a_finished_job_is_answered_by_observers_and_scored_as_by_hand() {
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let data = root.path().join("data");
    let env = [("LABELFOOL_JOBS__DATABASE", data.join("jobs.sqlite3")), ("LABELFOOL_JOBS__DIR", data.join("jobs"))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.to_str().unwrap())).collect();
    let s = Server::start_with_env(&config(root.path()), &env);
    let api = Api { s: &s };
    // Four pictures named as the tiny model's class for each (so each is classified correctly,
    // as an adversarial puzzle needs), and a second, different picture of the first's class: a
    // picture of that label in the job's folder, which a study without a reference set never
    // shows as a reference.
    let named = copy_named_as_classified(&s, KEY, &images, &sample_images()[..4]).await;
    let (first, wnid) = (images.join(&named[0].0), named[0].1.clone());
    let twin = format!("{wnid}_second.JPEG");
    image::open(&first).unwrap().fliph().to_rgb8().save(images.join(&twin)).unwrap();

    // A job still waiting cannot make a study; an unknown one is 404; the admin needs the key.
    let (status, long) = api.post("/jobs", json!({"images": images, "methods": ["labelfool", "deepfool"]})).await;
    assert_eq!(status, 201, "{long}");
    let (_, waiting) = api.post("/jobs", json!({"images": images, "methods": ["fgsm"], "limit": 1})).await;
    let (status, v) = api.post("/studies", json!({"job": waiting["id"]})).await;
    assert_eq!((status, v["error"]["code"].as_str()), (409, Some("conflict")), "{v}");
    let (status, v) = api.post("/studies", json!({"job": "0000000000000000"})).await;
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("unknown_job")), "{v}");
    let res = client().get(s.url("/studies")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let job = long["id"].as_str().unwrap().to_string();
    api.wait_done(&job).await;
    let (status, v) = api.post("/studies", json!({"job": job, "methods": ["fgsm"]})).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("methods")), "{v}");

    // The study: clean + two methods → three groups, no group with two puzzles of one source.
    let (status, study) = api.post("/studies", json!({"job": job, "name": "tiny study", "observers": 2})).await;
    assert_eq!(status, 201, "{study}");
    let id = study["id"].as_str().unwrap().to_string();
    assert_eq!(study["categories"], json!(["clean", "labelfool", "deepfool"]));
    assert_eq!(study["groups"].as_array().unwrap().len(), 3);
    assert!(study["seed"].as_u64().is_some(), "the drawn seed is reported: {study}");
    let (_, puzzles) = api.get(&format!("/studies/{id}/puzzles")).await;
    let puzzles = puzzles.as_array().unwrap().clone();
    assert_eq!(puzzles.len() as u64, study["puzzles"].as_u64().unwrap());
    let clean: Vec<&Value> = puzzles.iter().filter(|p| p["category"] == "clean").collect();
    assert_eq!(clean.len(), 5, "every source has its clean puzzle: {puzzles:#?}");
    assert!(clean.iter().all(|p| p["truth"] == true));
    assert!(puzzles.iter().filter(|p| p["category"] != "clean").all(|p| p["truth"] == false));
    assert!(puzzles.len() > 5, "some attack fooled the tiny model");
    let mut seen = HashSet::new();
    for p in &puzzles {
        assert!(seen.insert((p["group"].as_u64(), p["source"].as_str())), "two puzzles of one source in a group: {p}");
    }
    let by_id: HashMap<i64, &Value> = puzzles.iter().map(|p| (p["id"].as_i64().unwrap(), p)).collect();

    // A third observer by name; names are unique. Observers fill the groups in turn.
    let (status, carol) = api.post(&format!("/studies/{id}/observers"), json!({"name": "carol"})).await;
    assert_eq!(status, 201, "{carol}");
    let (status, _) = api.post(&format!("/studies/{id}/observers"), json!({"name": "carol"})).await;
    assert_eq!(status, 409);
    let (_, study) = api.get(&format!("/studies/{id}")).await;
    let observers = study["observers"].as_array().unwrap().clone();
    let groups: Vec<u64> = observers.iter().map(|o| o["group"].as_u64().unwrap()).collect();
    assert_eq!(groups, [0, 1, 2]);

    // Observers answer through their links, without the key: the first answers "Incorrect" to
    // everything, the second "Correct", the third alternates.
    let (status, v) = api.observe("/observe/nobody/session", None).await;
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("unknown_observer")), "{v}");
    let mut given: Vec<(String, String, bool, bool)> = Vec::new();
    for (n, o) in observers.iter().enumerate() {
        let token = o["token"].as_str().unwrap();
        let page = client().get(s.url(o["link"].as_str().unwrap())).send().await.unwrap();
        assert_eq!(page.status(), 200);
        assert!(page.text().await.unwrap().contains("Is this label correct"));
        let (status, mut session) = api.observe(&format!("/observe/{token}/session"), None).await;
        assert_eq!(status, 200, "{session}");
        let total = session["total"].as_u64().unwrap();
        assert_eq!(total, o["total"].as_u64().unwrap());
        let mut k = 0;
        while let Some(p) = session["puzzle"].as_object().cloned() {
            let pid = p["id"].as_i64().unwrap();
            let truth = by_id[&pid];
            assert_eq!(truth["group"].as_u64(), o["group"].as_u64(), "a puzzle of another group");
            assert_eq!(p["label"], truth["label"]);
            assert!(p.get("category").is_none() && p.get("truth").is_none(), "the observer sees no answer: {p:?}");
            let img = client().get(s.url(p["image"].as_str().unwrap())).send().await.unwrap();
            assert_eq!(img.headers()["content-type"], "image/png");
            image::load_from_memory_with_format(&img.bytes().await.unwrap(), image::ImageFormat::Png).unwrap();
            // Without a reference set no puzzle has reference pictures, clean or adversarial:
            // they never come from the job's folder.
            assert_eq!(p["references"], json!([]), "{p:?}");
            let said_correct = match n {
                0 => false,
                1 => true,
                _ => k % 2 == 0,
            };
            let answer = if said_correct { "correct" } else { "incorrect" };
            let (status, next) =
                api.observe(&format!("/observe/{token}/answers"), Some(json!({"puzzle": pid, "answer": answer}))).await;
            assert_eq!(status, 200, "{next}");
            // The first answer stands.
            let (status, _) = api
                .observe(&format!("/observe/{token}/answers"), Some(json!({"puzzle": pid, "answer": "correct"})))
                .await;
            assert_eq!(status, 409);
            given.push((
                o["name"].as_str().unwrap().to_string(),
                truth["category"].as_str().unwrap().to_string(),
                truth["truth"].as_bool().unwrap(),
                said_correct,
            ));
            k += 1;
            session = next;
        }
        assert_eq!((session["done"].as_bool(), session["answered"].as_u64()), (Some(true), Some(total)));
        // Another group's puzzle, or a malformed answer, is refused.
        let other = puzzles.iter().find(|p| p["group"] != o["group"]).unwrap();
        let (status, _) = api
            .observe(&format!("/observe/{token}/answers"), Some(json!({"puzzle": other["id"], "answer": "correct"})))
            .await;
        assert_eq!(status, 422);
        let (status, _) = api
            .observe(&format!("/observe/{token}/answers"), Some(json!({"puzzle": other["id"], "answer": "maybe"})))
            .await;
        assert!(status == 400 || status == 422, "{status}");
    }

    // Results equal the hand computation, per observer and pooled.
    let (status, results) = api.get(&format!("/studies/{id}/results")).await;
    assert_eq!(status, 200, "{results}");
    assert_eq!(results["all"]["answers"].as_u64(), Some(given.len() as u64));
    for o in results["all"]["per_observer"].as_array().unwrap() {
        let name = o["observer"].as_str().unwrap();
        let mine: Vec<_> = given.iter().filter(|g| g.0 == name).map(|g| (g.1.clone(), g.2, g.3)).collect();
        let hand = cr_pg(&mine);
        for r in o["rates"].as_array().unwrap() {
            let c = r["category"].as_str().unwrap();
            let (cr, pg) = hand.get(c).map_or((None, None), |(cr, pg)| (Some(*cr), *pg));
            close(&r["cr"], cr, &format!("{name} {c} CR"));
            close(&r["pg"], pg, &format!("{name} {c} PG"));
        }
    }
    let all: Vec<_> = given.iter().map(|g| (g.1.clone(), g.2, g.3)).collect();
    let hand = cr_pg(&all);
    for s in results["all"]["summary"].as_array().unwrap() {
        let c = s["category"].as_str().unwrap();
        let (cr, pg) = hand.get(c).map_or((None, None), |(cr, pg)| (Some(*cr), *pg));
        close(&s["pooled"]["cr"], cr, &format!("pooled {c} CR"));
        close(&s["pooled"]["pg"], pg, &format!("pooled {c} PG"));
    }
    // Observer 1 misjudged every clean puzzle and no adversarial one: PG = (0 − 1)/1 = −1.
    let first = &results["all"]["per_observer"][0];
    assert_eq!(first["observer"], "observer 1");
    for r in first["rates"].as_array().unwrap().iter().filter(|r| r["category"] != "clean" && r["answered"] != 0) {
        close(&r["pg"], Some(-1.0), "observer 1");
    }

    // The CSV has one row per answer; the chart is a PNG.
    let res = client().get(s.url(&format!("/studies/{id}/answers.csv"))).bearer_auth(KEY).send().await.unwrap();
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let text = res.text().await.unwrap();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers = reader.headers().unwrap().clone();
    assert!(headers.iter().any(|h| h == "misjudged"));
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), given.len());
    let chart = client().get(s.url(&format!("/studies/{id}/chart.png"))).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(chart.status(), 200);
    image::load_from_memory_with_format(&chart.bytes().await.unwrap(), image::ImageFormat::Png).unwrap();

    // After a restart on the same data, the study and every answer are still there.
    drop(s);
    let s = Server::start_with_env(&config(root.path()), &env);
    let api = Api { s: &s };
    let (_, again) = api.get(&format!("/studies/{id}/results")).await;
    assert_eq!(again["all"], results["all"]);
    let token = observers[2]["token"].as_str().unwrap();
    let (_, session) = api.observe(&format!("/observe/{token}/session"), None).await;
    assert_eq!(session["done"], true, "{session}");

    // Deleted: the study, its observers' links and its folder go; the job stays.
    let folder = data.join("jobs/studies").join(&id);
    assert!(folder.is_dir(), "{}", folder.display());
    let delete = || client().delete(s.url(&format!("/studies/{id}"))).bearer_auth(KEY).send();
    assert_eq!(delete().await.unwrap().status(), 204);
    assert!(!folder.exists());
    let (status, v) = api.get(&format!("/studies/{id}")).await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = api.observe(&format!("/observe/{token}/session"), None).await;
    assert_eq!(status, 404, "{v}");
    let (_, list) = api.get("/studies").await;
    assert_eq!(list, json!([]));
    let (status, v) = api.get(&format!("/jobs/{job}")).await;
    assert_eq!((status, v["state"].as_str()), (200, Some("done")), "{v}");
    let res = delete().await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(client().delete(s.url(&format!("/studies/{id}"))).send().await.unwrap().status(), 401);
}

/// A server with the tiny model, a folder of five pictures (four named as the class the model
/// gives each, and a second picture of the first's class) and a finished one-method job on it:
/// (the root, the pictures' folder, the data folder, the server, the job, the first picture's
/// wnid and file name).
async fn finished_job(
    studies: &str,
) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf, Server, String, (String, String)) {
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let data = root.path().join("data");
    let env = [("LABELFOOL_JOBS__DATABASE", data.join("jobs.sqlite3")), ("LABELFOOL_JOBS__DIR", data.join("jobs"))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.to_str().unwrap())).collect();
    let s = Server::start_with_env(&format!("{studies}\n{}", config(root.path())), &env);
    let named = copy_named_as_classified(&s, KEY, &images, &sample_images()[..4]).await;
    let (first, wnid) = (named[0].0.clone(), named[0].1.clone());
    image::open(images.join(&first))
        .unwrap()
        .fliph()
        .to_rgb8()
        .save(images.join(format!("{wnid}_second.JPEG")))
        .unwrap();
    let job = Api { s: &s }.finished_job(json!({"images": images, "methods": ["fgsm"]})).await;
    (root, images, data, s, job, (wnid, first))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Every string of a study's create body and an observer's is bounded on its own (422 naming
/// it), not only by the body limit; a name counts characters, not bytes.
#[tokio::test]
async fn study_and_observer_strings_are_bounded_field_by_field() {
    let (_root, _images, _data, s, job, _) = finished_job("").await;
    let api = Api { s: &s };
    let long = "x".repeat(5000);
    let refused = [
        (json!({"job": job, "name": "n".repeat(201)}), "name"),
        (json!({"job": job, "name": "   "}), "name"),
        (json!({"job": long}), "job"),
        (json!({"job": job, "model": long}), "model"),
        (json!({"job": job, "methods": vec!["fgsm"; 65]}), "methods"),
        (json!({"job": job, "methods": [long]}), "methods"),
    ];
    for (body, param) in refused {
        let (status, v) = api.post("/studies", body).await;
        assert_eq!((status, v["error"]["param"].as_str()), (422, Some(param)), "{v}");
        assert!(v.to_string().len() < 1000, "the answer echoes the field: {v}");
    }
    let (status, study) = api.post("/studies", json!({"job": job, "name": "é".repeat(200), "references": 0})).await;
    assert_eq!(status, 201, "{study}");
    assert_eq!(study["name"].as_str().unwrap().chars().count(), 200);
    let observers = format!("/studies/{}/observers", study["id"].as_str().unwrap());
    let (status, v) = api.post(&observers, json!({"name": "o".repeat(101)})).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("name")), "{v}");
    let (status, v) = api.post(&observers, json!({"name": "é".repeat(100)})).await;
    assert_eq!(status, 201, "{v}");
}

/// Links added at once: each gets its own name and the groups stay balanced, and of several
/// asking for one name exactly one gets it (the others 409). The cap, the name and the group
/// were read in one store call and written in another, so two at once saw the same free
/// `observer k` and the second insert failed on the table's UNIQUE (study, name).
#[tokio::test]
async fn observers_added_at_once_get_their_own_names_and_balanced_groups() {
    let (_root, _images, _data, s, job, _) = finished_job("").await;
    let api = Api { s: &s };
    let (id, _) = api.study_of(&job).await;
    let observers = format!("/studies/{id}/observers");
    let unnamed = futures::future::join_all((0..12).map(|_| api.post(&observers, json!({})))).await;
    let named = futures::future::join_all((0..6).map(|_| api.post(&observers, json!({"name": "dup"})))).await;
    for (status, v) in &unnamed {
        assert_eq!(*status, 201, "{v}");
    }
    let statuses: Vec<u16> = named.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses.iter().filter(|&&s| s == 201).count(), 1, "{named:?}");
    assert!(statuses.iter().all(|&s| s == 201 || s == 409), "{named:?}");
    let (_, study) = api.get(&format!("/studies/{id}")).await;
    let listed = study["observers"].as_array().unwrap();
    assert_eq!(listed.len(), 13, "{study}");
    let names: std::collections::HashSet<&str> = listed.iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 13, "{study}");
    let sizes: Vec<u64> = study["groups"].as_array().unwrap().iter().map(|g| g.as_u64().unwrap()).collect();
    let mut counts = vec![0u64; sizes.len()];
    for o in listed {
        counts[o["group"].as_u64().unwrap() as usize] += 1;
    }
    let used: Vec<u64> = counts.iter().zip(&sizes).filter(|(_, n)| **n > 0).map(|(c, _)| *c).collect();
    assert!(used.iter().max().unwrap() - used.iter().min().unwrap() <= 1, "groups {sizes:?}, observers {counts:?}");
}

/// An observer link lives `studies.observer_link_ttl_hours` (or its own `expires_in_hours`, up to
/// the maximum); past it every `/observe/{token}/…` route answers 410 Gone. One link can be
/// revoked: it then answers 404 like an unknown one, while its answers still count.
#[tokio::test]
async fn observer_links_expire_and_are_revoked_one_by_one() {
    let settings = "[studies]\nobserver_link_ttl_hours = 24\nmax_observer_link_ttl_hours = 48\n";
    let (root, _images, data, s, job, _) = finished_job(settings).await;
    let api = Api { s: &s };
    let (id, _) = api.study_of(&job).await;
    let observers = format!("/studies/{id}/observers");
    let hour = 3_600_000;
    let (status, alice) = api.post(&observers, json!({"name": "alice"})).await;
    assert_eq!(status, 201, "{alice}");
    let expires = alice["expires_ms"].as_i64().unwrap();
    assert!((expires - (now_ms() + 24 * hour)).abs() < 60_000, "the configured 24 h: {alice}");
    assert!(alice["revoked_ms"].is_null(), "{alice}");
    let (status, bob) = api.post(&observers, json!({"name": "bob", "expires_in_hours": 1})).await;
    assert_eq!(status, 201, "{bob}");
    assert!((bob["expires_ms"].as_i64().unwrap() - (now_ms() + hour)).abs() < 60_000, "{bob}");
    for hours in [0, 49] {
        let (status, v) = api.post(&observers, json!({"name": "eve", "expires_in_hours": hours})).await;
        assert_eq!((status, v["error"]["param"].as_str()), (422, Some("expires_in_hours")), "{v}");
    }

    // Bob answers once, then his link is revoked: 404 as if it never existed; his answer stays.
    let bob_token = bob["token"].as_str().unwrap().to_string();
    let (status, session) = api.observe(&format!("/observe/{bob_token}/session"), None).await;
    assert_eq!(status, 200, "{session}");
    let puzzle = session["puzzle"]["id"].as_i64().unwrap();
    let (status, v) = api
        .observe(&format!("/observe/{bob_token}/answers"), Some(json!({"puzzle": puzzle, "answer": "correct"})))
        .await;
    assert_eq!(status, 200, "{v}");
    let revoke =
        |name: &str| client().delete(s.url(&format!("/studies/{id}/observers/{name}"))).bearer_auth(KEY).send();
    assert_eq!(client().delete(s.url(&format!("/studies/{id}/observers/bob"))).send().await.unwrap().status(), 401);
    assert_eq!(revoke("bob").await.unwrap().status(), 204);
    for path in ["session", &format!("puzzles/{puzzle}/image")] {
        let (status, v) = api.observe(&format!("/observe/{bob_token}/{path}"), None).await;
        assert_eq!((status, v["error"]["code"].as_str()), (404, Some("unknown_observer")), "{path}: {v}");
    }
    let (status, v) = api
        .observe(&format!("/observe/{bob_token}/answers"), Some(json!({"puzzle": puzzle, "answer": "correct"})))
        .await;
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("unknown_observer")), "{v}");
    assert_eq!(revoke("bob").await.unwrap().status(), 204, "revoking twice is no error");
    let (status, v) = json(revoke("nobody").await.unwrap()).await;
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("unknown_observer")), "{v}");
    let (_, study) = api.get(&format!("/studies/{id}")).await;
    let listed = study["observers"].as_array().unwrap();
    let bob = listed.iter().find(|o| o["name"] == "bob").unwrap();
    assert!(bob["revoked_ms"].as_i64().is_some(), "{study}");
    assert!(listed.iter().find(|o| o["name"] == "alice").unwrap()["revoked_ms"].is_null());
    let (_, results) = api.get(&format!("/studies/{id}/results")).await;
    assert_eq!(results["all"]["answers"], 1, "{results}");
    let (status, _) = api.post(&observers, json!({"name": "bob"})).await;
    assert_eq!(status, 409, "a revoked observer's name stays taken");
    let (status, session) = api.observe(&format!("/observe/{}/session", alice["token"].as_str().unwrap()), None).await;
    assert_eq!(status, 200, "alice's link still works: {session}");

    // Alice's link, made to have expired (the server stopped, its database edited): 410 on every
    // observer route; a link made after it works.
    let env = [("LABELFOOL_JOBS__DATABASE", data.join("jobs.sqlite3")), ("LABELFOOL_JOBS__DIR", data.join("jobs"))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.to_str().unwrap())).collect();
    drop(s);
    let db = rusqlite::Connection::open(data.join("jobs.sqlite3")).unwrap();
    let n = db.execute("UPDATE observers SET expires_ms = ?1 WHERE name = 'alice'", [now_ms() - 1000]).unwrap();
    assert_eq!(n, 1);
    drop(db);
    let s = Server::start_with_env(&format!("{settings}\n{}", config(root.path())), &env);
    let api = Api { s: &s };
    let token = alice["token"].as_str().unwrap();
    for path in ["session", &format!("puzzles/{puzzle}/image"), &format!("puzzles/{puzzle}/references/0")] {
        let (status, v) = api.observe(&format!("/observe/{token}/{path}"), None).await;
        assert_eq!((status, v["error"]["code"].as_str()), (410, Some("observer_link_expired")), "{path}: {v}");
    }
    let (status, v) =
        api.observe(&format!("/observe/{token}/answers"), Some(json!({"puzzle": puzzle, "answer": "correct"}))).await;
    assert_eq!((status, v["error"]["code"].as_str()), (410, Some("observer_link_expired")), "{v}");
    let (status, carol) = api.post(&observers, json!({"name": "carol"})).await;
    assert_eq!(status, 201, "{carol}");
    let (status, v) = api.observe(&format!("/observe/{}/session", carol["token"].as_str().unwrap()), None).await;
    assert_eq!(status, 200, "{v}");
}

/// A study copies only files whose real path lies inside the folder they were named from: a
/// reference picture that is a link out of the reference set (a file, or a whole class folder) is
/// skipped, a puzzle's source that is a link out of the job's folder fails the study (422 `job`),
/// and nothing from outside reaches the study's folder.
#[tokio::test]
async fn a_study_never_copies_files_linked_from_outside_its_folders() {
    let (root, images, data, s, job, (wnid, first)) = finished_job("").await;
    let api = Api { s: &s };
    let refs = root.path().join("refs");
    reference_set(&refs, 1, true, &[]);
    // Placed as anyone with write access to the folders could.
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.JPEG");
    image::open(&sample_images()[6]).unwrap().to_rgb8().save(&secret).unwrap();
    let secret_pixels = image::open(&secret).unwrap().to_rgb8();
    std::os::unix::fs::symlink(&secret, refs.join(format!("{wnid}_leak.JPEG"))).unwrap();
    std::os::unix::fs::symlink(outside.path(), refs.join(&wnid)).unwrap();

    let (status, study) = api.post("/studies", json!({"job": job, "reference_images": refs, "references": 10})).await;
    assert_eq!(status, 201, "{study}");
    let copies = data.join("jobs/studies").join(study["id"].as_str().unwrap()).join("references");
    let copied: Vec<image::RgbImage> =
        std::fs::read_dir(&copies).unwrap().map(|e| image::open(e.unwrap().path()).unwrap().to_rgb8()).collect();
    assert!(copied.iter().any(|c| reference_of(c) == Some((class_index(&wnid), 0))), "the class's own picture");
    assert!(!copied.contains(&secret_pixels), "a file from outside the reference set was copied");

    // A puzzle's own source swapped for a link out of the folder: refused, naming the file.
    let source = images.join(&first);
    std::fs::remove_file(&source).unwrap();
    std::os::unix::fs::symlink(&secret, &source).unwrap();
    let (status, v) = api.post("/studies", json!({"job": job})).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("job")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("outside its folder"), "{v}");
}

/// Point 2 of issue 32: reference pictures come only from the reference set given when the study
/// is made, for the label the puzzle shows — the same rule for clean and adversarial puzzles, so
/// whether a puzzle has references says nothing of its truth — and never from the job's folder.
/// A set that misses a label shown is refused (422 naming it), as is one in the job's folder or
/// outside the folders the server may read. Whether the observer opened them is stored with
/// each answer, reported as a rate per category and in the CSV.
#[tokio::test]
async fn references_come_from_the_reference_set_by_the_same_rule_for_clean_and_adversarial_puzzles() {
    let (root, images, _data, s, job, (wnid, _)) = finished_job("").await;
    let api = Api { s: &s };
    let refs = root.path().join("refs");
    reference_set(&refs, 2, false, &[]);
    let (status, study) =
        api.post("/studies", json!({"job": job, "reference_images": refs, "references": 2, "observers": 2})).await;
    assert_eq!(status, 201, "{study}");
    let id = study["id"].as_str().unwrap().to_string();
    let (_, puzzles) = api.get(&format!("/studies/{id}/puzzles")).await;
    let by_id: HashMap<i64, Value> =
        puzzles.as_array().unwrap().iter().map(|p| (p["id"].as_i64().unwrap(), p.clone())).collect();
    let mut given: Vec<(String, bool)> = Vec::new();
    let mut with_refs: HashSet<String> = HashSet::new();
    for o in study["observers"].as_array().unwrap() {
        let token = o["token"].as_str().unwrap();
        let (_, mut session) = api.observe(&format!("/observe/{token}/session"), None).await;
        let mut k = 0;
        while let Some(p) = session["puzzle"].as_object().cloned() {
            let pid = p["id"].as_i64().unwrap();
            let puzzle = &by_id[&pid];
            let label = class_index(puzzle["label_wnid"].as_str().unwrap());
            // Both of the label's pictures from the set, whatever the puzzle's category.
            let shown: Vec<Option<(usize, usize)>> = served_references(&s, &p["references"]).await;
            let mut want = vec![Some((label, 0)), Some((label, 1))];
            let mut got = shown.clone();
            got.sort();
            want.sort();
            assert_eq!(got, want, "{} puzzle {pid} ({}): {shown:?}", puzzle["category"], puzzle["label"]);
            with_refs.insert(puzzle["category"].as_str().unwrap().to_string());
            let opened = k % 2 == 0;
            let answer = json!({"puzzle": pid, "answer": "correct", "references_opened": opened});
            let (status, next) = api.observe(&format!("/observe/{token}/answers"), Some(answer)).await;
            assert_eq!(status, 200, "{next}");
            given.push((puzzle["category"].as_str().unwrap().to_string(), opened));
            k += 1;
            session = next;
        }
    }
    assert_eq!(with_refs, HashSet::from(["clean".to_string(), "fgsm".to_string()]), "both kinds got references");
    // The rate at which references were opened, per category, and each answer's flag in the CSV.
    let (_, results) = api.get(&format!("/studies/{id}/results")).await;
    for sm in results["all"]["summary"].as_array().unwrap() {
        let c = sm["category"].as_str().unwrap();
        let mine: Vec<bool> = given.iter().filter(|g| g.0 == c).map(|g| g.1).collect();
        let rate = mine.iter().filter(|o| **o).count() as f64 / mine.len() as f64;
        close(&sm["references_opened_rate"], Some(rate), &format!("{c}: references opened"));
    }
    let csv = client().get(s.url(&format!("/studies/{id}/answers.csv"))).bearer_auth(KEY).send().await.unwrap();
    let text = csv.text().await.unwrap();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let at =
        reader.headers().unwrap().iter().position(|h| h == "references_opened").expect("a references_opened column");
    let mut flags: Vec<String> = reader.records().map(|r| r.unwrap()[at].to_string()).collect();
    let mut want: Vec<String> = given.iter().map(|g| g.1.to_string()).collect();
    flags.sort();
    want.sort();
    assert_eq!(flags, want, "{text}");

    // Without a reference set, no puzzle has any, though the job's folder has a second picture
    // of a class shown.
    assert!(images.join(format!("{wnid}_second.JPEG")).is_file());
    let (status, bare) = api.post("/studies", json!({"job": job, "observers": 2, "references": 10})).await;
    assert_eq!(status, 201, "{bare}");
    for o in bare["observers"].as_array().unwrap() {
        let (_, session) = api.observe(&format!("/observe/{}/session", o["token"].as_str().unwrap()), None).await;
        assert_eq!(session["puzzle"]["references"], json!([]), "{session}");
    }
    // A set without a label the study shows is refused, naming it; so is the job's own folder,
    // and a folder the server may not read.
    let partial = root.path().join("partial");
    reference_set(&partial, 1, false, &[wnid.as_str()]);
    let (status, v) = api.post("/studies", json!({"job": job, "reference_images": partial})).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("reference_images")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(&wnid), "{v}");
    // A picture past the server's upload limits (12 000 pixels a side) is not decoded: a label
    // with no other picture is missing as well.
    let wide = root.path().join("wide");
    reference_set(&wide, 1, false, &[wnid.as_str()]);
    std::fs::create_dir_all(wide.join(&wnid)).unwrap();
    image::RgbImage::new(12_001, 1).save(wide.join(&wnid).join("wide.png")).unwrap();
    let (status, v) = api.post("/studies", json!({"job": job, "reference_images": wide})).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("reference_images")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(&wnid), "{v}");
    let (status, v) = api.post("/studies", json!({"job": job, "reference_images": images})).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("reference_images")), "{v}");
    let (status, v) = api.post("/studies", json!({"job": job, "reference_images": "/etc"})).await;
    assert_eq!(status, 403, "{v}");
}

/// The reference pictures a session's puzzle lists, fetched as its observer would: the (class,
/// k) each stands for.
async fn served_references(s: &Server, urls: &Value) -> Vec<Option<(usize, usize)>> {
    let mut out = Vec::new();
    for u in urls.as_array().unwrap() {
        let res = client().get(s.url(u.as_str().unwrap())).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let img = image::load_from_memory(&res.bytes().await.unwrap()).unwrap().to_rgb8();
        out.push(reference_of(&img));
    }
    out
}

/// An adversarial puzzle is an image the model classified correctly and the attack fooled: a
/// job on pictures the model never got right gives none, and the study refuses (422 naming the
/// method) rather than show "adversarial" images that were wrong before the attack, or make a
/// group with nothing of the method in it.
#[tokio::test]
async fn a_method_without_a_fooled_correct_image_is_refused_by_name() {
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let s = Server::start(&config(root.path()));
    let api = Api { s: &s };
    // Each picture named as the class after the one the model gives it: all misclassified.
    let classes = std::fs::read_to_string(models_dir().join("tiny/classes.txt")).unwrap();
    let wnids: Vec<&str> = classes.lines().filter_map(|l| l.split_whitespace().next()).collect();
    let scratch = tempfile::tempdir().unwrap();
    for (name, wnid) in copy_named_as_classified(&s, KEY, scratch.path(), &sample_images()[..4]).await {
        let k = wnids.iter().position(|w| *w == wnid).unwrap();
        let wrong = wnids[(k + 1) % wnids.len()];
        let rest = name.split_once('_').unwrap().1;
        std::fs::copy(scratch.path().join(&name), images.join(format!("{wrong}_{rest}"))).unwrap();
    }
    let job = api.finished_job(json!({"images": images, "methods": ["fgsm"]})).await;
    let (status, v) = api.post("/studies", json!({"job": job, "observers": 2})).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("methods")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("fgsm"), "{v}");
}

/// Observers are only placed in groups that have puzzles: a group emptied (the server stopped,
/// its database edited, as a study whose method fooled few images can leave one) gets nobody,
/// and nobody is "done" before answering anything.
#[tokio::test]
async fn no_observer_is_placed_in_a_group_without_puzzles() {
    let (root, _images, data, s, job, _) = finished_job("").await;
    let api = Api { s: &s };
    let (id, study) = api.study_of(&job).await;
    assert_eq!(study["groups"].as_array().unwrap().len(), 2, "{study}");
    drop(s);
    let db = rusqlite::Connection::open(data.join("jobs.sqlite3")).unwrap();
    let n = db.execute("DELETE FROM puzzles WHERE study_id = ?1 AND grp = 0", [&id]).unwrap();
    assert!(n > 0);
    drop(db);
    let env = [("LABELFOOL_JOBS__DATABASE", data.join("jobs.sqlite3")), ("LABELFOOL_JOBS__DIR", data.join("jobs"))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.to_str().unwrap())).collect();
    let s = Server::start_with_env(&config(root.path()), &env);
    let api = Api { s: &s };
    for name in ["ann", "bob", "cy"] {
        let (status, o) = api.post(&format!("/studies/{id}/observers"), json!({"name": name})).await;
        assert_eq!(status, 201, "{o}");
        assert_eq!(o["group"], 1, "{o}");
        assert!(o["total"].as_u64().unwrap() > 0, "{o}");
        let (_, session) = api.observe(&format!("/observe/{}/session", o["token"].as_str().unwrap()), None).await;
        assert_eq!(session["done"], false, "{session}");
    }
}

/// The sources are shuffled by a seed before the Latin square spreads them over the groups:
/// a given seed is recorded and makes the same groups again; without one a seed is drawn and
/// reported; different seeds make different groups.
#[tokio::test]
async fn sources_are_spread_over_the_groups_by_a_recorded_seed() {
    let (_root, _images, _data, s, job, _) = finished_job("").await;
    let api = Api { s: &s };
    let groups_of = |puzzles: &Value| -> Vec<(String, String, u64)> {
        let mut v: Vec<_> = puzzles
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let text = |k: &str| p[k].as_str().unwrap().to_string();
                (text("source"), text("category"), p["group"].as_u64().unwrap())
            })
            .collect();
        v.sort();
        v
    };
    let mut made = Vec::new();
    for seed in [42u64, 42, 1, 2, 3, 4, 5] {
        let (status, study) = api.post("/studies", json!({"job": job, "seed": seed, "references": 0})).await;
        assert_eq!(status, 201, "{study}");
        assert_eq!(study["seed"], seed, "{study}");
        let (_, puzzles) = api.get(&format!("/studies/{}/puzzles", study["id"].as_str().unwrap())).await;
        made.push(groups_of(&puzzles));
    }
    assert_eq!(made[0], made[1], "the same seed makes the same groups");
    assert!(made[1..].iter().any(|g| *g != made[0]), "every seed made the same groups: {made:?}");
    let (status, drawn) = api.post("/studies", json!({"job": job, "references": 0})).await;
    assert_eq!(status, 201, "{drawn}");
    assert!(drawn["seed"].as_u64().is_some(), "{drawn}");
}

/// SplitMix64: a deterministic draw for the synthetic observers.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The paper's numbers recovered from a known confusion model: 30 synthetic observers answer
/// through their links (the real routes, without the key), each misjudging a clean puzzle with
/// probability 0.1, an FGSM one with 0.3 and a DeepFool one with 0.2, so the true PG is
/// (0.3 − 0.1)/0.1 = 2 and (0.2 − 0.1)/0.1 = 1. The results' pooled PG comes with a bootstrap
/// interval that holds the true PG and is narrower with 30 observers than with the first 10;
/// every answer's time is stored and in the CSV.
#[tokio::test]
async fn a_simulated_study_recovers_the_true_gain_within_its_interval() {
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let s = Server::start(&config(root.path()));
    let api = Api { s: &s };
    copy_named_as_classified(&s, KEY, &images, &sample_images()).await;
    let job = api.finished_job(json!({"images": images, "methods": ["fgsm", "deepfool"]})).await;
    let (status, study) = api.post("/studies", json!({"job": job, "observers": 30, "seed": 7, "references": 0})).await;
    assert_eq!(status, 201, "{study}");
    let id = study["id"].as_str().unwrap().to_string();
    let (_, puzzles) = api.get(&format!("/studies/{id}/puzzles")).await;
    let truth: HashMap<i64, (String, String, bool)> = puzzles
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let text = |k: &str| p[k].as_str().unwrap().to_string();
            (p["id"].as_i64().unwrap(), (text("source"), text("category"), p["truth"].as_bool().unwrap()))
        })
        .collect();
    let model = |category: &str| match category {
        "clean" => 0.1,
        "fgsm" => 0.3,
        "deepfool" => 0.2,
        other => panic!("{other}"),
    };
    let true_pg = [("fgsm", 2.0), ("deepfool", 1.0)];
    // The interval's width per method after 10 and after 30 observers.
    let mut widths: Vec<HashMap<String, f64>> = Vec::new();
    let mut sent = 0;
    for (n, o) in study["observers"].as_array().unwrap().iter().enumerate() {
        let token = o["token"].as_str().unwrap();
        let (_, mut session) = api.observe(&format!("/observe/{token}/session"), None).await;
        while let Some(p) = session["puzzle"].as_object().cloned() {
            let pid = p["id"].as_i64().unwrap();
            let (source, category, label_true) = &truth[&pid];
            // A draw fixed by the observer and the puzzle's source and category (not its id, which
            // a study draws anew), uniform in [0, 1).
            let key = format!("{n}/{source}/{category}").bytes().fold(0u64, |h, b| mix(h ^ u64::from(b)));
            let misjudged = (mix(key) >> 11) as f64 / (1u64 << 53) as f64 <= model(category);
            let said_correct = *label_true != misjudged;
            let answer = json!({"puzzle": pid, "answer": if said_correct { "correct" } else { "incorrect" },
                "elapsed_ms": 400 + n});
            let (status, next) = api.observe(&format!("/observe/{token}/answers"), Some(answer)).await;
            assert_eq!(status, 200, "{next}");
            sent += 1;
            session = next;
        }
        if n + 1 == 10 || n + 1 == 30 {
            let (status, results) = api.get(&format!("/studies/{id}/results")).await;
            assert_eq!(status, 200, "{results}");
            let mut w = HashMap::new();
            for sm in results["all"]["summary"].as_array().unwrap().iter().filter(|sm| sm["category"] != "clean") {
                let ci = &sm["pooled_pg_ci"];
                let (low, high) = (ci["low"].as_f64().unwrap(), ci["high"].as_f64().unwrap());
                let method = sm["category"].as_str().unwrap();
                assert!(low <= sm["pooled"]["pg"].as_f64().unwrap() && sm["pooled"]["pg"].as_f64().unwrap() <= high);
                if n + 1 == 30 {
                    let pg = true_pg.iter().find(|(m, _)| *m == method).unwrap().1;
                    assert!(low <= pg && pg <= high, "{method}: the true PG {pg} is outside [{low}, {high}]: {sm}");
                    assert!(sm["answer_ms_median"].as_f64().is_some_and(|ms| (400.0..430.0).contains(&ms)), "{sm}");
                }
                w.insert(method.to_string(), high - low);
            }
            widths.push(w);
        }
    }
    for (method, _) in true_pg {
        assert!(widths[1][method] < widths[0][method], "{method}: 30 observers {widths:?} vs 10");
    }
    // Every answer with its time in the CSV; an answer time past an hour is refused.
    let res = client().get(s.url(&format!("/studies/{id}/answers.csv"))).bearer_auth(KEY).send().await.unwrap();
    let text = res.text().await.unwrap();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let at = reader.headers().unwrap().iter().position(|h| h == "elapsed_ms").expect("an elapsed_ms column");
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), sent);
    assert!(rows.iter().all(|r| r[at].parse::<u32>().is_ok_and(|ms| (400..430).contains(&ms))), "{text}");
    let (status, o) = api.post(&format!("/studies/{id}/observers"), json!({})).await;
    assert_eq!(status, 201, "{o}");
    let token = o["token"].as_str().unwrap();
    let (_, session) = api.observe(&format!("/observe/{token}/session"), None).await;
    let pid = session["puzzle"]["id"].as_i64().unwrap();
    let late = json!({"puzzle": pid, "answer": "correct", "elapsed_ms": 3_600_001});
    let (status, v) = api.observe(&format!("/observe/{token}/answers"), Some(late)).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("elapsed_ms")), "{v}");
}

/// Point 6 of issue 32, the paper's mode: with `design: "all_groups"` each observer answers every
/// puzzle of every group exactly once, one group after the other (from their own group on, so
/// observers start in different groups), each group in an order of their own. The default stays
/// one group per observer.
#[tokio::test]
async fn in_the_all_groups_design_an_observer_answers_every_group_in_sequence() {
    let (_root, images, _data, s, _, _) = finished_job("").await;
    let api = Api { s: &s };
    let job = api.finished_job(json!({"images": images, "methods": ["fgsm", "deepfool"]})).await;

    let (status, one) = api.post("/studies", json!({"job": job, "observers": 1})).await;
    assert_eq!(status, 201, "{one}");
    assert_eq!(one["design"], "one_group", "{one}");
    let sizes: Vec<u64> = one["groups"].as_array().unwrap().iter().map(|g| g.as_u64().unwrap()).collect();
    assert_eq!(one["observers"][0]["total"].as_u64(), Some(sizes[0]), "{one}");

    let (status, study) = api.post("/studies", json!({"job": job, "observers": 3, "design": "all_groups"})).await;
    assert_eq!(status, 201, "{study}");
    assert_eq!(study["design"], "all_groups", "{study}");
    let id = study["id"].as_str().unwrap().to_string();
    let groups = study["groups"].as_array().unwrap().len();
    assert_eq!(groups, 3, "{study}");
    let (_, puzzles) = api.get(&format!("/studies/{id}/puzzles")).await;
    let group_of: HashMap<i64, u64> =
        puzzles.as_array().unwrap().iter().map(|p| (p["id"].as_i64().unwrap(), p["group"].as_u64().unwrap())).collect();
    let mut firsts = HashSet::new();
    for o in study["observers"].as_array().unwrap() {
        assert_eq!(o["total"].as_u64(), Some(group_of.len() as u64), "{o}");
        let token = o["token"].as_str().unwrap();
        let (_, mut session) = api.observe(&format!("/observe/{token}/session"), None).await;
        let mut seen: Vec<i64> = Vec::new();
        while let Some(p) = session["puzzle"].as_object().cloned() {
            let pid = p["id"].as_i64().unwrap();
            seen.push(pid);
            let (status, next) = api
                .observe(&format!("/observe/{token}/answers"), Some(json!({"puzzle": pid, "answer": "correct"})))
                .await;
            assert_eq!(status, 200, "{next}");
            session = next;
            assert!(seen.len() <= group_of.len(), "more puzzles than the study has");
        }
        // Every puzzle exactly once.
        let mut sorted = seen.clone();
        sorted.sort();
        let mut all: Vec<i64> = group_of.keys().copied().collect();
        all.sort();
        assert_eq!(sorted, all, "{} did not answer every puzzle once", o["name"]);
        // The groups one after the other: each group's puzzles in one run, from their own group on.
        let mut runs: Vec<u64> = seen.iter().map(|p| group_of[p]).collect();
        runs.dedup();
        assert_eq!(runs.len(), groups, "groups interleaved for {}: {runs:?}", o["name"]);
        let start = o["group"].as_u64().unwrap();
        let want: Vec<u64> = (0..groups as u64).map(|k| (start + k) % groups as u64).collect();
        assert_eq!(runs, want, "{}", o["name"]);
        firsts.insert(start);
    }
    assert_eq!(firsts.len(), 3, "the observers start in different groups");
    let (_, results) = api.get(&format!("/studies/{id}/results")).await;
    assert_eq!(results["all"]["answers"].as_u64(), Some(3 * group_of.len() as u64), "{results}");
}

/// A study with fewer observers than groups leaves a group unanswered: the study and its
/// results say which (`groups_without_observers`), until an observer is added; an observer whose
/// link was revoked before they finished no longer covers their group.
#[tokio::test]
async fn groups_without_observers_are_reported() {
    let (_root, _images, _data, s, job, _) = finished_job("").await;
    let api = Api { s: &s };
    let (status, study) = api.post("/studies", json!({"job": job, "observers": 1})).await;
    assert_eq!(status, 201, "{study}");
    let id = study["id"].as_str().unwrap().to_string();
    assert_eq!(study["groups"].as_array().unwrap().len(), 2, "{study}");
    assert_eq!(study["groups_without_observers"], json!([1]), "{study}");
    let (_, results) = api.get(&format!("/studies/{id}/results")).await;
    assert_eq!(results["groups_without_observers"], json!([1]), "{results}");
    let (status, o) = api.post(&format!("/studies/{id}/observers"), json!({"name": "bea"})).await;
    assert_eq!((status, o["group"].as_u64()), (201, Some(1)), "{o}");
    let (_, study) = api.get(&format!("/studies/{id}")).await;
    assert_eq!(study["groups_without_observers"], json!([]), "{study}");
    let (_, results) = api.get(&format!("/studies/{id}/results")).await;
    assert_eq!(results["groups_without_observers"], json!([]), "{results}");
    let res = client().delete(s.url(&format!("/studies/{id}/observers/bea"))).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(res.status(), 204);
    let (_, study) = api.get(&format!("/studies/{id}")).await;
    assert_eq!(study["groups_without_observers"], json!([1]), "{study}");
}

/// Downloads carry names that say what they are: a job's results `job-<id>-results.jsonl`, a
/// study's answers `study-<id>-answers.csv`; a job's report is served as one HTML page (its
/// charts inside it), `job-<id>-report-<model>.html`, not as raw Markdown.
#[tokio::test]
async fn downloads_are_named_and_the_report_is_a_page() {
    let (_root, _images, _data, s, job, _) = finished_job("").await;
    let api = Api { s: &s };
    let get = |path: String| client().get(s.url(&path)).bearer_auth(KEY).send();
    let disposition = |res: &reqwest::Response| {
        res.headers().get("content-disposition").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
    };
    let res = get(format!("/jobs/{job}/results")).await.unwrap();
    assert_eq!(disposition(&res), format!("attachment; filename=\"job-{job}-results.jsonl\""));
    let (id, _) = api.study_of(&job).await;
    let res = get(format!("/studies/{id}/answers.csv")).await.unwrap();
    assert_eq!(disposition(&res), format!("attachment; filename=\"study-{id}-answers.csv\""));

    let res = get(format!("/jobs/{job}/report/tiny")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/html"), "{:?}", res.headers());
    assert_eq!(disposition(&res), format!("inline; filename=\"job-{job}-report-tiny.html\""));
    let html = res.text().await.unwrap();
    assert!(html.contains("<h1>LabelFool evaluation: tiny</h1>"), "{html}");
    assert!(html.contains("<table") && html.contains("<th>method</th>"), "{html}");
    assert!(!html.contains("](charts/") && !html.contains("|---|"), "Markdown left in the page: {html}");
    // Every chart inside the page, as a PNG that decodes.
    let charts: Vec<&str> =
        html.split("src=\"data:image/png;base64,").skip(1).map(|t| t.split('"').next().unwrap()).collect();
    assert!(!charts.is_empty(), "{html}");
    for b64 in charts {
        let png = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap();
        image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap();
    }
    for bad in ["/jobs/{job}/report/nomodel", "/jobs/0000000000000000/report/tiny", "/jobs/{job}/report/..%2F..%2Fetc"]
    {
        let res = get(bad.replace("{job}", &job)).await.unwrap();
        assert_eq!(res.status(), 404, "{bad}");
    }
    assert_eq!(client().get(s.url(&format!("/jobs/{job}/report/tiny"))).send().await.unwrap().status(), 401);
}
