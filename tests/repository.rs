//! Own models as a serving stack holds them: Triton model repositories (the setup's Lite2 traced
//! plainly, a tiny copy laid out by the test), load and unload at run time through the Open
//! Inference Protocol's repository extension, and transfer checks inside one server.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::Value;

const LITE2: &str = "efficientnet-lite2";

fn triton_repo() -> std::path::PathBuf {
    let repo = models_dir().join("triton-repo");
    assert!(
        repo.join(LITE2).join("config.pbtxt").is_file(),
        "no Triton repository under {}: run scripts/setup",
        repo.display()
    );
    repo
}

/// Lite0 (bundle, the default) next to the setup's Triton repository.
fn lite_config(extra: &str) -> String {
    default_model_config(&format!("{extra}\n[[repositories]]\npath = \"{}\"\n", triton_repo().display()))
}

/// The tiny test model copied into a Triton layout, as a user would lay out a traced network.
fn tiny_triton(repo: &Path, name: &str) {
    let dir = repo.join(name);
    std::fs::create_dir_all(dir.join("1")).unwrap();
    std::fs::copy(models_dir().join("tiny/model.pt"), dir.join("1/model.pt")).unwrap();
    let labels: Vec<String> = std::fs::read_to_string(models_dir().join("tiny/classes.txt"))
        .unwrap()
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.split(',').next().unwrap().trim().to_string())
        .collect();
    std::fs::write(dir.join("labels.txt"), labels.join("\n") + "\n").unwrap();
    std::fs::write(
        dir.join("config.pbtxt"),
        format!(
            r#"name: "{name}"
platform: "pytorch_libtorch"
max_batch_size: 2
input [
  {{
    name: "INPUT__0"
    data_type: TYPE_FP32
    dims: [ 3, 32, 32 ]
  }}
]
output [
  {{
    name: "OUTPUT__0"
    data_type: TYPE_FP32
    dims: [ 10 ]
    label_filename: "labels.txt"
  }}
]
"#
        ),
    )
    .unwrap();
    std::fs::write(dir.join("labelfool.toml"), "resize_short_side = 36\n").unwrap();
}

async fn classify(s: &Server, model: &str, bytes: Vec<u8>) -> (u16, Value) {
    json(
        client()
            .post(s.url(&format!("/classify?model={model}")))
            .multipart(multipart_image(bytes, "x.png"))
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn index(s: &Server) -> Vec<Value> {
    let (status, v) = json(client().post(s.url("/v2/repository/index")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{v}");
    v.as_array().unwrap().clone()
}

fn state_of(index: &[Value], name: &str) -> String {
    index.iter().find(|e| e["name"] == name).map(|e| e["state"].as_str().unwrap().to_string()).unwrap_or_default()
}

#[tokio::test]
async fn lite2_from_a_triton_repository_is_served_next_to_lite0() {
    let s = Server::start(&lite_config(""));
    let (_, models) = json(client().get(s.url("/models")).send().await.unwrap()).await;
    let by_name = |n: &str| models["models"].as_array().unwrap().iter().find(|m| m["name"] == n).cloned().unwrap();
    let lite2 = by_name(LITE2);
    assert_eq!(lite2["state"], "ready", "{lite2}");
    assert_eq!(lite2["platform"], "pytorch_libtorch");
    assert_eq!(lite2["version"], "1");
    assert_eq!(lite2["input"]["size"], 260);
    assert_eq!(lite2["input"]["mean"], serde_json::json!([0.5, 0.5, 0.5]), "normalisation applied by the server");
    assert_eq!(lite2["feature_dim"], Value::Null, "a plain traced network has no features method");
    assert_eq!(lite2["matrix"]["method"], "from-weights", "the data-free matrix is computed at load");
    let lite1 = by_name("efficientnet-lite1");
    assert_eq!(lite1["state"], "unsupported");
    assert!(lite1["reason"].as_str().unwrap().contains("onnxruntime_onnx"), "{lite1}");
    for model in ["efficientnet-lite0", LITE2] {
        let (status, v) = classify(&s, model, read_fixture("images/n02391049_zebra.JPEG")).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["top"][0]["label"], "zebra", "{model}: {v}");
        assert_eq!(v["top"][0]["wnid"], "n02391049", "labelfool.toml's classes = \"imagenet\" gives WordNet ids");
    }
    let (status, meta) = json(client().get(s.url(&format!("/v2/models/{LITE2}"))).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(meta["platform"], "pytorch_libtorch");
    assert_eq!(meta["versions"][0], "1");
    let idx = index(&s).await;
    assert_eq!(state_of(&idx, LITE2), "READY");
    assert_eq!(state_of(&idx, "efficientnet-lite1"), "UNAVAILABLE");
    let (status, v) =
        json(client().post(s.url("/v2/repository/models/efficientnet-lite1/load")).send().await.unwrap()).await;
    assert_eq!(status, 400, "an unsupported platform cannot load: {v}");
    assert!(v["error"].as_str().unwrap().contains("onnxruntime_onnx"), "OIP error shape: {v}");
}

#[tokio::test]
async fn lite2_attacks_round_trip_on_the_fixture_images() {
    let s = Arc::new(Server::start(&lite_config("")));
    // Every other fixture (tench, alligator, black swan, husky, jaguar, zebra): Lite2's attacks are the suite's
    // dearest on the CPU, and six round trips show the property as well as twelve.
    let images: Vec<_> = sample_images().into_iter().step_by(2).collect();
    assert!(images.len() >= 6);
    let mut tasks = Vec::new();
    for path in images.clone() {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let res = client()
                .post(s.url(&format!("/attack?model={LITE2}")))
                .multipart(multipart_image(std::fs::read(&path).unwrap(), "x.jpg"))
                .send()
                .await
                .unwrap();
            let (status, v) = json(res).await;
            assert_eq!(status, 200, "{}: {v}", path.display());
            let png = base64::engine::general_purpose::STANDARD.decode(v["png_base64"].as_str().unwrap()).unwrap();
            let (_, again) = classify(&s, LITE2, png).await;
            (path, v["success"].as_bool().unwrap(), v["target"]["index"].clone(), again["top"][0]["index"].clone())
        }));
    }
    let mut round_trips = 0;
    for t in tasks {
        let (path, success, target, top1) = t.await.unwrap();
        assert!(success, "{}: the attack did not succeed", path.display());
        assert_eq!(top1, target, "{}: the delivered PNG is not classified as the target", path.display());
        round_trips += 1;
    }
    assert_eq!(round_trips, images.len());
}

/// While 16 clients classify with Lite0, Lite2 is unloaded and loaded three times: no Lite0
/// request fails, Lite2 requests get 200 or 503 (never a hang or a 500), and the repository
/// index shows each state.
#[tokio::test]
async fn load_and_unload_under_load() {
    let s = Arc::new(Server::start(&lite_config("")));
    let stop = Arc::new(AtomicBool::new(false));
    let (lite0_ok, lite2_ok, lite2_503) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let image = read_fixture("images/n02391049_zebra.JPEG");
    let mut clients = Vec::new();
    for i in 0..18 {
        let (s, stop, image) = (s.clone(), stop.clone(), image.clone());
        let (lite0_ok, lite2_ok, lite2_503) = (lite0_ok.clone(), lite2_ok.clone(), lite2_503.clone());
        clients.push(tokio::spawn(async move {
            // 16 clients on Lite0, 2 on Lite2.
            let model = if i < 16 { "efficientnet-lite0" } else { LITE2 };
            while !stop.load(Ordering::Relaxed) {
                let res = tokio::time::timeout(Duration::from_secs(60), classify(&s, model, image.clone()))
                    .await
                    .unwrap_or_else(|_| panic!("{model}: a request hung for 60 s"));
                match (model, res.0) {
                    ("efficientnet-lite0", 200) => lite0_ok.fetch_add(1, Ordering::Relaxed),
                    (LITE2, 200) => lite2_ok.fetch_add(1, Ordering::Relaxed),
                    (LITE2, 503) => {
                        assert_eq!(res.1["error"]["code"], "model_unavailable", "{}", res.1);
                        lite2_503.fetch_add(1, Ordering::Relaxed)
                    }
                    (m, status) => panic!("{m}: status {status}: {}", res.1),
                };
            }
        }));
    }
    let count = |n: &Arc<AtomicUsize>| n.load(Ordering::Relaxed);
    wait_until("both models answer the clients before the first unload", Duration::from_secs(60), || {
        let ready = count(&lite0_ok) > 0 && count(&lite2_ok) > 0;
        async move { ready }
    })
    .await;
    for round in 0..3 {
        let res = client().post(s.url(&format!("/v2/repository/models/{LITE2}/unload"))).send().await.unwrap();
        assert_eq!(res.status(), 200, "round {round}: unload");
        assert_eq!(state_of(&index(&s).await, LITE2), "UNAVAILABLE");
        let (_, ready) = json(client().get(s.url(&format!("/v2/models/{LITE2}/ready"))).send().await.unwrap()).await;
        assert_eq!(ready["ready"], false);
        let (status, meta) = json(client().get(s.url(&format!("/v2/models/{LITE2}"))).send().await.unwrap()).await;
        assert_eq!((status, meta["state"].as_str()), (200, Some("unloaded")), "metadata shows the state: {meta}");
        let ready_only: Vec<Value> = {
            let (_, v) = json(
                client()
                    .post(s.url("/v2/repository/index"))
                    .json(&serde_json::json!({"ready": true}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            v.as_array().unwrap().clone()
        };
        assert!(ready_only.iter().all(|e| e["name"] != LITE2), "ready-only index lists {LITE2}");
        // The Lite2 clients meet the unloaded model (a 503) before it is loaded again …
        let refused = count(&lite2_503);
        wait_until(&format!("round {round}: a Lite2 client got 503 while unloaded"), Duration::from_secs(60), || {
            let seen = count(&lite2_503) > refused;
            async move { seen }
        })
        .await;
        let res = client().post(s.url(&format!("/v2/repository/models/{LITE2}/load"))).send().await.unwrap();
        assert_eq!(res.status(), 200, "round {round}: load");
        assert_eq!(state_of(&index(&s).await, LITE2), "READY");
        // … and the loaded one (a 200) before the next unload.
        let served = count(&lite2_ok);
        wait_until(&format!("round {round}: a Lite2 client got 200 once loaded"), Duration::from_secs(60), || {
            let seen = count(&lite2_ok) > served;
            async move { seen }
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (l0, l2, l2u) =
        (lite0_ok.load(Ordering::Relaxed), lite2_ok.load(Ordering::Relaxed), lite2_503.load(Ordering::Relaxed));
    assert!(l0 > 16, "Lite0 answered {l0} requests");
    assert!(l2 > 0 && l2u > 0, "Lite2 saw both states: {l2} × 200, {l2u} × 503");
    assert_eq!(state_of(&index(&s).await, LITE2), "READY");
}

#[tokio::test]
async fn explicit_loading_rescans_guards_and_reports_failures() {
    let repo = tempfile::tempdir().unwrap();
    tiny_triton(repo.path(), "tiny-triton");
    std::fs::create_dir_all(repo.path().join("broken")).unwrap();
    std::fs::write(repo.path().join("broken/config.pbtxt"), "name: \"broken\"\nmax_batch_size: eight\n").unwrap();
    let extra = format!(
        "[server]\napi_key = \"k\"\n\n[[repositories]]\npath = \"{}\"\nload_at_startup = false\n",
        repo.path().display()
    );
    let s = Server::start(&tiny_config(&extra));
    let c = client();
    let auth = |r: reqwest::RequestBuilder| r.bearer_auth("k");
    let res = c.post(s.url("/v2/repository/models/tiny-triton/load")).send().await.unwrap();
    assert_eq!(res.status(), 401, "the API key guards loading");
    let (_, idx) = json(auth(c.post(s.url("/v2/repository/index"))).send().await.unwrap()).await;
    let idx = idx.as_array().unwrap().clone();
    assert_eq!(state_of(&idx, "tiny-triton"), "UNAVAILABLE", "explicit mode: not loaded at start-up");
    let broken = idx.iter().find(|e| e["name"] == "broken").unwrap();
    assert!(broken["reason"].as_str().unwrap().contains("line 2"), "a broken config says where: {broken}");
    let res = auth(c.post(s.url("/classify?model=tiny-triton")))
        .multipart(multipart_image(read_fixture("images/n02391049_zebra.JPEG"), "z.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    // A model directory added after start-up is found by the next index or load.
    tiny_triton(repo.path(), "tiny-later");
    let (status, v) = json(auth(c.post(s.url("/models/tiny-later/load"))).send().await.unwrap()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "ready");
    let (status, _) = json(auth(c.post(s.url("/v2/repository/models/tiny-triton/load"))).send().await.unwrap()).await;
    assert_eq!(status, 200);
    // The Triton copy is the tiny model itself: same answers (through max_batch_size 2 chunks).
    for model in ["tiny", "tiny-triton"] {
        let res = auth(c.post(s.url(&format!("/classify?model={model}&top_k=3"))))
            .multipart(multipart_image(read_fixture("images/n02391049_zebra.JPEG"), "z.jpg"))
            .send()
            .await
            .unwrap();
        let (status, v) = json(res).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["top"][0]["index"], {
            let res = auth(c.post(s.url("/classify?model=tiny")))
                .multipart(multipart_image(read_fixture("images/n02391049_zebra.JPEG"), "z.jpg"))
                .send()
                .await
                .unwrap();
            json(res).await.1["top"][0]["index"].clone()
        });
    }
    let (status, v) = json(auth(c.post(s.url("/models/tiny-triton/unload"))).send().await.unwrap()).await;
    assert_eq!((status, v["state"].as_str()), (200, Some("unloaded")));
    let (status, v) = json(auth(c.post(s.url("/models/nope/load"))).send().await.unwrap()).await;
    assert_eq!(status, 404, "{v}");
    // A model file that is not TorchScript fails to load with the reason; the index keeps it.
    tiny_triton(repo.path(), "tiny-corrupt");
    std::fs::write(repo.path().join("tiny-corrupt/1/model.pt"), b"not a torchscript file").unwrap();
    let (status, v) = json(auth(c.post(s.url("/v2/repository/models/tiny-corrupt/load"))).send().await.unwrap()).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("cannot load"), "{v}");
    let (_, idx) = json(auth(c.post(s.url("/v2/repository/index"))).send().await.unwrap()).await;
    let corrupt = idx.as_array().unwrap().iter().find(|e| e["name"] == "tiny-corrupt").cloned().unwrap();
    assert_eq!(corrupt["state"], "UNAVAILABLE");
    assert!(corrupt["reason"].as_str().unwrap().contains("cannot load"), "{corrupt}");
    // The server goes on: the bundle models still answer.
    let res = auth(c.post(s.url("/classify?model=tiny")))
        .multipart(multipart_image(read_fixture("images/n02391049_zebra.JPEG"), "z.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn verify_reports_transfer_to_other_models() {
    let repo = tempfile::tempdir().unwrap();
    tiny_triton(repo.path(), "tiny-triton");
    let extra = format!("[[repositories]]\npath = \"{}\"\n", repo.path().display());
    let s = Server::start(&tiny_config(&extra));
    let c = client();
    let mut transferred = 0;
    for path in sample_images().iter().take(4) {
        let v = post_image(&s, "/attack?model=tiny&verify=tiny-triton,tiny-triton", path).await;
        let t = v["transfer"].as_array().unwrap();
        assert_eq!(t.len(), 1, "duplicates are verified once: {v}");
        // The Triton copy is the same network: the attack transfers exactly when it succeeded,
        // and the target maps across class lists by name (the copy's labels have no wnids).
        assert_eq!(t[0]["target"]["index"], v["target"]["index"]);
        assert_eq!(t[0]["transferred"], v["success"], "{v}");
        assert_eq!(t[0]["original"]["index"], v["original"]["index"]);
        transferred += usize::from(t[0]["transferred"] == true);
    }
    assert!(transferred > 0);
    let res = c
        .post(s.url("/attack?model=tiny&verify=nope"))
        .multipart(multipart_image(read_fixture("images/n02391049_zebra.JPEG"), "z.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404, "an unknown verify model is refused before the attack");
    let many: Vec<String> = (0..9).map(|i| format!("m{i}")).collect();
    let res = c
        .post(s.url(&format!("/attack?model=tiny&verify={}", many.join(","))))
        .multipart(multipart_image(read_fixture("images/n02391049_zebra.JPEG"), "z.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    // With Accept: image/png the transfer verdicts travel in a header.
    let res = c
        .post(s.url("/attack?model=tiny&verify=tiny-triton"))
        .header("accept", "image/png")
        .multipart(multipart_image(read_fixture("images/n02391049_zebra.JPEG"), "z.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let h = res.headers()["x-labelfool-transferred"].to_str().unwrap().to_string();
    assert!(h.starts_with("tiny-triton="), "{h}");
}

/// A `[[models]]` entry may describe a plain TorchScript file instead of pointing at a bundle: no
/// `model.json`, the preprocessing in the configuration.
#[tokio::test]
async fn a_described_torchscript_file_needs_no_metadata_file() {
    let m = models_dir();
    let described = format!(
        "[[models]]\nname = \"plain\"\ntorchscript = \"{}\"\ndescription = {{ size = 32, resize_short_side = 36, classes = \"{}\", module_max_batch = 3 }}\n",
        m.join("tiny/model.pt").display(),
        m.join("tiny/classes.txt").display()
    );
    let s = Server::start(&tiny_config(&described));
    let (_, models) = json(client().get(s.url("/models")).send().await.unwrap()).await;
    let plain = models["models"].as_array().unwrap().iter().find(|x| x["name"] == "plain").cloned().unwrap();
    assert_eq!(plain["state"], "ready", "{plain}");
    assert_eq!(plain["input"]["resize_short_side"], 36);
    assert_eq!(plain["matrix"]["method"], "from-weights");
    for image in sample_images().iter().take(3) {
        let bytes = std::fs::read(image).unwrap();
        let (_, a) = classify(&s, "plain", bytes.clone()).await;
        let (_, b) = classify(&s, "tiny", bytes).await;
        assert_eq!(a["top"][0]["index"], b["top"][0]["index"], "{a} vs {b}");
    }
    // A described model without its size is refused at start-up, naming the key.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        format!("[[models]]\nname = \"plain\"\ntorchscript = \"{}\"\n", m.join("tiny/model.pt").display()),
    )
    .unwrap();
    let out = serve_until_exit(&path, dir.path());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("description = { size"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
